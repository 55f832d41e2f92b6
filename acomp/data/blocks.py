"""Cutting tokenized documents into whole blocks and writing them as MDS samples, within budget.

One block is ``block_size`` consecutive tokens of one document: no packing across documents, the remainder
of a document and documents shorter than a block are dropped and counted (:class:`Counts`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .plan import SPLITS, BuildPlan
from .sources import Document, SourceIssue

SHARD_HASHES = ["sha1", "xxh64"]


def smallest_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype holding every id below ``vocab_size``."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def corpus_columns(dtype: str, block_size: int) -> dict[str, str]:
    """MDS column encodings of a corpus: fixed-shape ids (no per-sample header), labels as strings."""
    return {
        "input_ids": f"ndarray:{dtype}:{block_size}",
        "domain": "str",
        "doc_id": "str",
        "block_index": "uint32",
    }


def normalize_compression(compression: str | None) -> str | None:
    """Validate a shard compression name; gzip is refused because it stamps the time into every shard."""
    from streaming.base.compression import get_compressions, is_compression

    if compression in (None, "", "none", "None"):
        return None
    if compression.split(":")[0] in ("gz", "gzip"):
        raise ValueError(
            f"compression {compression!r}: gzip embeds a timestamp, so shards would not be byte-identical "
            f"between builds; use 'zstd' (or 'zstd:LEVEL', 'br', 'bz2')"
        )
    if not is_compression(compression):
        families = sorted({c.split(":")[0] for c in get_compressions()} - {"gz"})
        raise ValueError(
            f"unknown compression {compression!r}; choose none or one of {families} (optionally :LEVEL)"
        )
    return compression


@dataclass
class Counts:
    """What happened to the documents of one split (and domain); all token counts add up to input_tokens."""

    docs: int = 0
    kept_docs: int = 0
    blocks: int = 0
    tokens: int = 0
    input_tokens: int = 0
    dropped_short_docs: int = 0
    dropped_short_tokens: int = 0
    dropped_remainder_tokens: int = 0
    dropped_budget_docs: int = 0
    dropped_budget_tokens: int = 0

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class BlockWriter:
    """Cuts each tokenized document into whole blocks and writes them to its split, within budget."""

    def __init__(self, plan: BuildPlan, writers: dict[str, Any]):
        self.plan = plan
        self.writers = writers
        self.counts: dict[str, dict[str, Counts]] = {s: {} for s in SPLITS}
        self.used: dict[str, dict[str, int]] = {}
        self.documents = 0
        self.replaced_sequences = 0
        self.replaced_docs = 0
        self.files: dict[str, list[str]] = {}
        self.issues: list[dict[str, str]] = []

    def domain_done(self, domain: str) -> bool:
        return self.plan.budget(domain).done(self.used.setdefault(domain, {s: 0 for s in SPLITS}))

    def note_file(self, source_index: int, path: str) -> None:
        files = self.files.setdefault(str(source_index), [])
        if not files or files[-1] != path:
            files.append(path)

    def issue(self, source_index: int, item: SourceIssue) -> None:
        self.note_file(source_index, item.path)
        self.issues.append({"path": item.path, "kind": item.kind, "detail": item.detail})

    def add(self, source_index: int, doc: Document, ids: np.ndarray) -> None:
        plan, bs = self.plan, self.plan.block_size
        self.note_file(source_index, doc.path)
        self.documents += 1
        if doc.replaced:
            self.replaced_sequences += doc.replaced
            self.replaced_docs += 1
        budget = plan.budget(doc.domain)
        split = budget.split_for(doc.doc_id, doc.domain, plan.seed, plan.val_fraction)
        c = self.counts[split].setdefault(doc.domain, Counts())
        used = self.used.setdefault(doc.domain, {s: 0 for s in SPLITS})
        n = len(ids)
        c.docs += 1
        c.input_tokens += n
        if n < bs:
            c.dropped_short_docs += 1
            c.dropped_short_tokens += n
            return
        whole = n // bs
        c.dropped_remainder_tokens += n - whole * bs
        cap = getattr(budget, split)
        take = whole if cap is None else max(0, min(whole, cap - used[split]))
        if take < whole:
            c.dropped_budget_docs += 1
            c.dropped_budget_tokens += (whole - take) * bs
        if take == 0:
            return
        blocks = ids[: take * bs].reshape(take, bs)
        writer = self.writers[split]
        for i in range(take):
            writer.write(
                {"input_ids": blocks[i], "domain": doc.domain, "doc_id": doc.doc_id, "block_index": i}
            )
        used[split] += take
        c.kept_docs += 1
        c.blocks += take
        c.tokens += take * bs
