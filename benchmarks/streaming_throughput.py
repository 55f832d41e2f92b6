#!/usr/bin/env python
"""Streaming read throughput: tokens/s from local MDS shards into (pinned) batches.

Measures ``CorpusDataset`` + ``build_dataloader`` as training uses them: shuffled, collated to
``LongTensor [B, block_size]``, pinned and copied to the GPU when CUDA is available. The target is 50x what
one H100 consumes training a 1B model (about 40k tokens/s), i.e. 2M tokens/s.

    python benchmarks/streaming_throughput.py                  # builds a ~3,000-block corpus in .bench/ once
    python benchmarks/streaming_throughput.py --corpus data/pile-6k --batch-size 8

Prints a table; records nothing by itself (copy the numbers into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

try:
    import acomp.data  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from acomp.cli import non_negative_int, positive_int  # noqa: E402
from acomp.data import CorpusDataset, Document, SourceSpec, build_corpus, build_dataloader  # noqa: E402
from acomp.data.sources import iter_documents  # noqa: E402

TARGET = 50 * 40_000
REPO = Path(__file__).resolve().parents[1]


def long_documents(path: Path, min_chars: int) -> Path:
    """A jsonl of long documents (consecutive stdlib files joined, cycled until ``min_chars``).

    Real text through the real pipeline, but long enough that nearly every token lands in a block and an
    epoch holds thousands of blocks, so per-epoch startup does not swamp the steady-state rate.
    """
    if path.exists():
        return path
    texts = [d.text for d in iter_documents(SourceSpec("stdlib")) if isinstance(d, Document)]
    path.parent.mkdir(parents=True, exist_ok=True)
    written, doc, part = 0, [], 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < min_chars:
            for text in texts:
                doc.append(text)
                if sum(map(len, doc)) >= 400_000:
                    fh.write(json.dumps({"text": "\n".join(doc), "id": f"doc{part}"}) + "\n")
                    written += sum(map(len, doc))
                    doc, part = [], part + 1
                    if written >= min_chars:
                        break
    return path


def ensure_corpus(path: Path, block_size: int, min_blocks: int) -> Path:
    """A corpus of about ``min_blocks`` blocks with a 32k BPE (reused when already built identically)."""
    source = long_documents(
        path.parent / f"long-docs-{min_blocks * block_size}.jsonl", min_blocks * block_size * 4
    )
    build_corpus(
        str(source),
        path,
        train_tokenizer_vocab=32000,
        tokenizer_train_chars=50_000_000,
        block_size=block_size,
        id_field="id",
        val_fraction=0.0,
        num_workers=os.cpu_count() or 1,
    )
    return path


def measure(corpus: Path, batch_size: int, workers: int, min_tokens: int, device: torch.device) -> dict:
    """Tokens/s over whole epochs until at least ``min_tokens`` were delivered (startup timed apart)."""
    pin = device.type == "cuda"
    tokens = batches = epochs = 0
    start = time.perf_counter()
    ds = CorpusDataset(corpus, "train", seed=0, batch_size=batch_size)
    loader = build_dataloader(
        ds, batch_size, num_workers=workers, pin_memory=pin, persistent_workers=workers > 0
    )
    setup = time.perf_counter() - start
    first = None
    start = time.perf_counter()
    while tokens < min_tokens:
        for batch in loader:
            ids = batch["input_ids"]
            if pin:
                ids = ids.to(device, non_blocking=True)
            if first is None:
                first = time.perf_counter() - start
            tokens += ids.numel()
            batches += 1
        epochs += 1
    if pin:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del loader, ds
    gc.collect()
    return dict(
        tokens=tokens, batches=batches, epochs=epochs, seconds=elapsed, setup=setup, first=first or 0.0
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, help="a built corpus (default: build .bench/stdlib-<block>)")
    p.add_argument(
        "--block-size", type=positive_int, default=6144, help="block size of the built corpus (default: 6144)"
    )
    p.add_argument(
        "--min-blocks",
        type=positive_int,
        default=3000,
        help="size of the corpus built when --corpus is not given",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="blocks per batch (default: 8)")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        nargs="+",
        default=[0, 2],
        help="loader worker counts, one row each",
    )
    p.add_argument(
        "--min-tokens", type=positive_int, default=200_000_000, help="read at least this many tokens per run"
    )
    args = p.parse_args()

    corpus = args.corpus or ensure_corpus(
        REPO / ".bench" / f"long-{args.block_size}-{args.min_blocks}", args.block_size, args.min_blocks
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = CorpusDataset(corpus, "train", batch_size=args.batch_size)
    blocks, block = ds.num_samples, ds.block_size
    del ds
    gc.collect()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none"
    print(
        f"corpus {corpus}: {blocks:,} blocks of {block} tokens; batch {args.batch_size}; device {device} ({gpu})"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print()
    print(
        f"{'loader':28} {'tokens/s':>14} {'samples/s':>10} {'x target':>9} {'setup s':>8} {'1st batch s':>12}"
    )
    for workers in args.workers:
        r = measure(corpus, args.batch_size, workers, args.min_tokens, device)
        rate = r["tokens"] / r["seconds"]
        name = f"num_workers={workers}" + (", pinned->GPU" if device.type == "cuda" else ", CPU")
        print(
            f"{name:28} {rate:>14,.0f} {rate / block:>10,.0f} {rate / TARGET:>8.1f}x {r['setup']:>8.2f} "
            f"{r['first']:>12.2f}"
        )
    print(f"\ntarget: {TARGET:,} tokens/s (50 x 40k tokens/s, one H100 training a 1B model)")


if __name__ == "__main__":
    main()
