"""Shared helpers for the corpus and streaming tests: tiny corpora built once per test session.

Building is the slow part (tokenizer training, a few seconds), so each distinct corpus is built once per
pytest process and reused by both test modules (pytest would build a fixture imported into two modules
twice). Also runnable as a script: ``python tests/support/corpora.py rank CORPUS SPLIT OUT.json`` is one rank of
the multi-rank tests (RANK/WORLD_SIZE/... come from the environment).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from runs import rank_env

from acomp.train.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
BLOCK = 512
VOCAB = 2048
LIMIT_DOCS = 300

_built: dict[str, Path] = {}


def stdlib_corpus(tmp_path_factory) -> Path:
    """The demo corpus: stdlib sources, a 2,048-token BPE trained on them, 512-token blocks, 300 docs."""
    return _once(
        tmp_path_factory,
        "stdlib",
        dict(source="stdlib", train_tokenizer_vocab=VOCAB, block_size=BLOCK, limit_docs=LIMIT_DOCS),
    )


def _once(tmp_path_factory, name: str, kwargs: dict[str, Any]) -> Path:
    from acomp.data import build_corpus

    if name not in _built:
        out = tmp_path_factory.mktemp("corpora") / name
        build_corpus(out=out, progress=False, **kwargs)
        _built[name] = out
    return _built[name]


def tree_hashes(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (for byte-identity checks)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip
    }


def read_split(corpus: Path, split: str) -> list[dict[str, Any]]:
    """Every sample of a split in stored order, as plain Python values (numpy ids kept)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(corpus), split=split, shuffle=False, batch_size=1)
    samples = [ds[i] for i in range(ds.num_samples)]
    del ds
    gc.collect()
    return samples


def sample_keys(batch: dict[str, Any]) -> list[tuple[str, int]]:
    """(doc_id, block_index) of each sample of a collated batch: a sample's identity."""
    return list(zip(batch["doc_id"], batch["block_index"].tolist()))


def run_ranks(corpus: Path, split: str, out_dir: Path, world_size: int = 2, **options: Any) -> list[dict]:
    """Run ``world_size`` rank processes over one corpus split; return each rank's JSON report."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, **rank_env(rank, world_size, port)}
        env.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
        out = out_dir / f"rank{rank}.json"
        cmd = [sys.executable, __file__, "rank", str(corpus), split, str(out), json.dumps(options)]
        procs.append((subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True), out))
    reports = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=240)
        if proc.returncode != 0:
            raise RuntimeError(f"rank process failed ({proc.returncode}):\n{err[-4000:]}")
        reports.append(json.loads(out.read_text()))
    return reports


def _rank_main(corpus: str, split: str, out: str, options_json: str) -> None:
    """One rank: a full epoch, then an interrupted epoch and its resumption (fresh dataset objects)."""
    import torch.distributed as dist

    from acomp.data import CorpusDataset, build_dataloader

    opts = json.loads(options_json)
    bs, workers, stop_after = opts.get("batch_size", 2), opts.get("num_workers", 0), opts.get("stop_after", 3)
    dist.init_process_group("gloo")  # ours, so streaming neither starts nor tears down one per dataset

    def loader():
        ds = CorpusDataset(corpus, split, seed=opts.get("seed", 0), batch_size=bs)
        return build_dataloader(ds, bs, num_workers=workers, drop_last=False)

    full = [k for b in loader() for k in sample_keys(b)]
    gc.collect()
    dl = loader()
    first = []
    for i, batch in enumerate(dl):
        first += sample_keys(batch)
        if i + 1 == stop_after:
            break
    state = dl.state_dict()
    del dl
    gc.collect()
    dl = loader()
    dl.load_state_dict(state)
    rest = [k for b in dl for k in sample_keys(b)]
    Path(out).write_text(json.dumps({"full": full, "first": first, "rest": rest, "state": state}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "rank":
        _rank_main(*sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} rank CORPUS SPLIT OUT.json OPTIONS_JSON")
