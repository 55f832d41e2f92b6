#!/usr/bin/env python
"""Preprocessing throughput: the corpus pipeline against the bare tokenizer, same text, same machine.

The bare baseline is the Rust tokenizer's batch encode (``encode_batch_fast``, one thread per process) over
documents already in memory, in 1 or N processes. The pipeline is ``build_corpus`` end to end: listing and
reading the files, decoding, train/val hashing, tokenizing in ``num_workers`` processes, cutting blocks,
writing MDS shards with hashes, checksumming the sources and writing the manifest. Each pipeline row is
compared with the bare tokenizer in as many processes as it has tokenizer workers ("vs bare/core": the
pipeline's tokens/s over the bare tokens/s, i.e. per core at equal core count, so the machine's own scaling
limits - shared caches, clocks that drop when more cores run - are not charged to the pipeline); ``tok/CPU-s``
divides by all CPU time the pipeline used, its reading/writing process included. Target: >= 70%.

    python benchmarks/preprocess_throughput.py                       # stdlib, a 32k BPE trained first
    python benchmarks/preprocess_throughput.py --source data.jsonl.zst --tokenizer /models/opt-2.7b
    python benchmarks/preprocess_throughput.py --copies 4 --workers 1 2 4 8   # longer runs on a big machine

Prints a table; records nothing by itself (copy the numbers into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import acomp.data  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acomp.cli import positive_int  # noqa: E402
from acomp.data import Document, SourceSpec, build_corpus, iter_documents  # noqa: E402
from acomp.data.encode import serial_tokenizers  # noqa: E402
from acomp.data.tokenizer import (  # noqa: E402
    backend_json,
    load_tokenizer,
    register_control_tokens,
    train_bpe_tokenizer,
)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _texts(source: str, limit: int | None) -> list[str]:
    out = []
    for item in iter_documents(SourceSpec(source)):
        if isinstance(item, Document):
            out.append(item.text)
            if limit is not None and len(out) >= limit:
                break
    return out


def _encode_share(job: tuple[str, list[str]]) -> tuple[int, float]:
    """Encode one share of the texts on one thread; returns (tokens, seconds spent encoding)."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer_json, texts = job
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 256):
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i : i + 256], add_special_tokens=False))
    return tokens, time.perf_counter() - start


def bare(tokenizer_json: str, texts: list[str], procs: int, repeats: int) -> tuple[float, int]:
    """Best-of-``repeats`` tokens/s of the bare tokenizer in ``procs`` processes of one thread each.

    Each process encodes an interleaved share; the rate is all tokens over the slowest share's encoding time
    (process start-up is not timed), i.e. the machine's own scaling with no pipeline around it.
    """
    shares = [(tokenizer_json, texts[i::procs]) for i in range(procs)]
    best, tokens = 0.0, 0
    for _ in range(repeats):
        if procs == 1:
            with serial_tokenizers():
                results = [_encode_share(shares[0])]
        else:
            with multiprocessing.get_context("fork").Pool(procs) as pool:
                results = pool.map(_encode_share, shares)
        tokens = sum(n for n, _ in results)
        best = max(best, tokens / max(sec for _, sec in results))
    return best, tokens


def pipeline(args: argparse.Namespace, tok_dir: Path, workers: int, work: Path) -> tuple[float, float, int]:
    """Best-of-``repeats`` (tokens/s wall, tokens per CPU-second) of a full build."""
    best_wall, best_cpu, tokens = 0.0, 0.0, 0
    for r in range(args.repeats):
        out = work / f"w{workers}-{r}"
        cpu0, start = _cpu_seconds(), time.perf_counter()
        m = build_corpus(
            args.source,
            out,
            tokenizer=str(tok_dir),
            block_size=args.block_size,
            limit_docs=args.limit_docs,
            num_workers=workers,
            progress=False,
        )
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
        tokens = sum(s["input_tokens"] for s in m["splits"].values())
        best_wall, best_cpu = max(best_wall, tokens / wall), max(best_cpu, tokens / cpu)
        shutil.rmtree(out)
    return best_wall, best_cpu, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="stdlib", help="a source name of build_corpus (default: stdlib)")
    p.add_argument("--tokenizer", help="tokenizer name/path (default: train a BPE of --vocab on the text)")
    p.add_argument(
        "--vocab", type=positive_int, default=32000, help="size of the trained BPE (default: 32000)"
    )
    p.add_argument("--limit-docs", type=positive_int, default=None, help="documents to use (default: all)")
    p.add_argument("--block-size", type=positive_int, default=2048, help="tokens per block (default: 2048)")
    p.add_argument(
        "--workers",
        type=positive_int,
        nargs="+",
        default=[1, os.cpu_count() or 1],
        help="worker counts, one row each",
    )
    p.add_argument(
        "--repeats", type=positive_int, default=2, help="runs of each configuration (best is shown)"
    )
    p.add_argument(
        "--copies",
        type=positive_int,
        default=1,
        help="use the documents this many times (as distinct documents) for longer runs",
    )
    args = p.parse_args()

    texts = _texts(args.source, args.limit_docs)
    work = Path(tempfile.mkdtemp(prefix="acomp-bench-"))
    if args.copies > 1:
        texts = texts * args.copies
        args.source, args.limit_docs = str(work / "copies.jsonl"), None
        with open(args.source, "w", encoding="utf-8") as fh:
            for text in texts:
                fh.write(json.dumps({"text": text}) + "\n")
    chars = sum(len(t) for t in texts)
    try:
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
        else:
            tok = train_bpe_tokenizer(texts, args.vocab, show_progress=False)
        register_control_tokens(tok)
        tok_dir = work / "tokenizer"
        tok.save_pretrained(str(tok_dir))

        base, tokens = bare(backend_json(tok), texts, 1, args.repeats)
        cores = os.cpu_count() or 1
        label = args.tokenizer or f"BPE {args.vocab} trained on the text"
        print(f"source {args.source}: {len(texts):,} documents, {chars / 1e6:.1f}M chars, {tokens:,} tokens")
        print(f"tokenizer {label} (vocab {len(tok):,}); block {args.block_size}")
        print(f"machine: {platform.machine()}, {cores} cores, python {platform.python_version()}")
        print()
        print(
            f"{'run':32} {'tokens/s':>11} {'procs':>6} {'tok/s/proc':>11} {'tok/CPU-s':>10} {'vs bare/core':>13}"
        )
        for workers in args.workers:
            ref = base if workers == 1 else bare(backend_json(tok), texts, workers, args.repeats)[0]
            name = "bare, 1 process" if workers == 1 else f"bare, {workers} processes"
            print(
                f"{name:32} {ref:>11,.0f} {workers:>6} {ref / workers:>11,.0f} {ref / workers:>10,.0f} {'100%':>13}"
            )
            wall, cpu, _ = pipeline(args, tok_dir, workers, work)
            procs = "1" if workers == 1 else f"{workers}+1"
            name = f"pipeline num_workers={workers}"
            print(
                f"{name:32} {wall:>11,.0f} {procs:>6} {wall / workers:>11,.0f} {cpu:>10,.0f} {wall / ref:>12.0%}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
