"""The corpus as the trainer sees it: manifest + tokenizer, and an endless, resumable stream of batches.

`data.path` is a local corpus directory or a remote URI (``s3://bucket/prefix``); a remote corpus is read
through a local cache (`data.cache_dir`) that holds its manifest, tokenizer and the shards downloaded so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from acomp.config import ConfigError, RunConfig


class DataError(ConfigError):
    """The corpus at data.path cannot be used for this run (missing, empty, unreadable, or not the model's);
    the message names the path and the mismatch. Raised before the first training step."""


@dataclass
class Corpus:
    path: Path  # local directory holding manifest.json and tokenizer/ (for a remote corpus: its cache)
    manifest: dict
    tokenizer: object
    uri: str | None = None  # a remote data.path (s3://...), streamed through the cache at `path`

    @property
    def source(self) -> str:
        """data.path as given: the remote URI, or the local directory."""
        return self.uri or str(self.path)

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"


def cache_dir_for(path: str, cache_dir: str | None) -> Path:
    """The local cache of a remote corpus: data.cache_dir, else a stable per-URI directory under $TMPDIR."""
    from acomp.data import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir(path)


def ensure_corpus(cfg: RunConfig, is_main: bool) -> None:
    """Build the corpus at data.path on rank 0 when it is missing and data.build_if_missing says how (a remote
    data.path is fetched by open_corpus, on every rank)."""
    from acomp.data.dataset import is_remote
    from acomp.train.distributed import barrier

    if is_remote(cfg.data.path):
        if cfg.data.build_if_missing:
            raise ConfigError(
                f"data.build_if_missing cannot build into the remote data.path={cfg.data.path!r}: build the "
                f"corpus locally and upload it (python -m acomp.data upload DIR {cfg.data.path})"
            )
        return
    path = Path(cfg.data.path)
    if is_main and not (path / "manifest.json").is_file() and cfg.data.build_if_missing:
        from acomp.data import build_corpus

        print(f"building the corpus at {path} ({cfg.data.build_if_missing})", flush=True)
        try:
            build_corpus(out=path, **cfg.data.build_if_missing)
        except (TypeError, ValueError, FileNotFoundError) as e:  # an unknown or bad option, a missing source
            raise ConfigError(f"data.build_if_missing: {e}") from None
    barrier()


def open_corpus(path: str | Path, cache_dir: str | Path | None = None) -> Corpus:
    """The corpus at `path` with its tokenizer. A remote `path` has its manifest and tokenizer fetched into
    `cache_dir` (data.cache_dir; default: a per-URI directory under $TMPDIR)."""
    from transformers import AutoTokenizer

    from acomp.data import RemoteError, fetch_corpus, read_manifest
    from acomp.data.dataset import is_remote

    uri = str(path) if is_remote(path) else None
    if uri is not None:
        local = cache_dir_for(uri, cache_dir)
        try:
            manifest = fetch_corpus(uri, local)
        except (RemoteError, ValueError) as e:
            raise DataError(f"data.path={uri!r}: {e}") from None
    else:
        local = Path(path)
        if not local.is_dir():
            raise DataError(
                f"data.path={str(local)!r}: no such corpus directory (build one with preprocess/)"
            )
        try:
            manifest = read_manifest(local)
        except (OSError, ValueError) as e:
            raise DataError(f"data.path={str(local)!r}: {e}") from None
    where = uri or str(local)
    if not (local / "tokenizer").is_dir():  # else transformers reads the path as a malformed hub repo id
        raise DataError(f"data.path={where!r}: its tokenizer/ directory is missing (rebuild the corpus)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local / "tokenizer"))
    except (OSError, ValueError) as e:
        raise DataError(f"data.path={where!r}: cannot load its tokenizer/: {e}") from None
    return Corpus(path=local, manifest=manifest, tokenizer=tokenizer, uri=uri)


def check_corpus_fits(corpus: Corpus, model_config) -> None:
    """The corpus' token ids must index the model's embedding table (clear error instead of an index error)."""
    from acomp.data import check_manifest

    try:
        check_manifest(corpus.manifest, vocab_size=model_config.vocab_size)
    except ValueError as e:
        raise ConfigError(f"data.path={corpus.source!r} does not fit the model: {e}") from None


def _dataset(cfg: RunConfig, corpus: Corpus, split: str, **options):
    """A CorpusDataset of `split`, with the manifest open_corpus read and checked once per run (a remote
    corpus is read through its cache)."""
    from acomp.data import CorpusDataset

    if corpus.uri is None:
        return CorpusDataset(
            str(corpus.path), split=split, manifest=corpus.manifest, verify=cfg.data.verify, **options
        )
    try:
        return CorpusDataset(
            corpus.uri,
            split=split,
            local_cache=corpus.path,
            manifest=corpus.manifest,
            verify=cfg.data.verify,
            **options,
        )
    except ValueError as e:
        if "Reused local directory" not in str(e):
            raise
        raise DataError(
            f"data.path={corpus.uri!r}: its cache {corpus.path} is in use by another job on this machine "
            f"(streaming allows one live dataset per cache directory); give this run another data.cache_dir"
        ) from None


def train_loader(cfg: RunConfig, corpus: Corpus, micro_batch_size: int):
    """This rank's share of the shuffled training split (streaming partitions it over ranks)."""
    from acomp.data import RemoteError, build_dataloader

    try:  # checks the shards (data.verify); a damaged one raises CorruptShardError naming the file
        dataset = _dataset(
            cfg, corpus, "train", shuffle=cfg.data.shuffle, seed=cfg.train.seed, batch_size=micro_batch_size
        )
    except DataError:
        raise
    except (FileNotFoundError, ValueError, RemoteError) as e:
        raise DataError(f"data.path={corpus.source!r}: {e}") from None
    import torch

    # Pinned batches let the loop copy them to the GPU without a host sync (acomp.train.loop.train_step).
    pin = torch.cuda.is_available()
    return build_dataloader(dataset, micro_batch_size, num_workers=cfg.data.num_workers, pin_memory=pin)


def val_dataset(cfg: RunConfig, corpus: Corpus):
    """The held-out split's blocks by global index (acomp.eval.CorpusBlocks), as the eval protocol reads them."""
    from acomp.eval import CorpusBlocks

    return CorpusBlocks.of(_dataset(cfg, corpus, cfg.data.val_split, shuffle=False, seed=0, batch_size=1))


class Batches:
    """Micro-batches forever: a new epoch starts when the loader runs out. `state_dict()` is the loader's,
    which records the epoch and samples consumed so a resumed run continues mid-epoch exactly."""

    def __init__(self, loader):
        self.loader = loader
        self._it = None

    def __next__(self) -> dict:
        from acomp.data import CorruptShardError

        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
            except CorruptShardError as e:
                raise CorruptShardError(worker_error_line(e)) from None
        raise RuntimeError(
            "the training split yielded no batch (is it smaller than one micro-batch per rank?)"
        )

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def worker_error_line(error: Exception) -> str:
    """The error's own message: a dataloader worker's exception reaches the main process as "Caught X in
    DataLoader worker process N. Original Traceback ...: X: <message>"; keep the message only."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    name = type(error).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
