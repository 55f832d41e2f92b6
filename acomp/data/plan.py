"""What a corpus build reads and keeps: the sources, the train/val assignment and each domain's block budget.

A :class:`BuildPlan` is everything that decides a corpus' content. Documents go to train or val by a hash of
their id (never by position), so the split is stable whatever the order of work or the number of workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .recipe import Recipe, load_recipe, parse_count
from .sources import Document, SourceIssue, SourceListing, SourceSpec, iter_documents, resolve_files

SPLITS = ("train", "val")
DEFAULT_BLOCK_SIZE = 6144
DEFAULT_VAL_FRACTION = 0.05


def split_of(doc_id: str, domain: str, seed: int, val_fraction: float) -> str:
    """Train or val by a hash of (seed, domain, doc id): stable whatever the order or worker count."""
    if val_fraction <= 0.0:
        return "train"
    if val_fraction >= 1.0:
        return "val"
    digest = hashlib.blake2b(f"{seed}\0{domain}\0{doc_id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


@dataclass
class DomainBudget:
    """The most blocks each split of one domain may take (None = no cap); the manifest's `budget_blocks`."""

    train: int | None = None
    val: int | None = None

    def split_for(self, doc_id: str, domain: str, seed: int, val_fraction: float) -> str:
        if self.train == 0:
            return "val"
        if self.val == 0:
            return "train"
        return split_of(doc_id, domain, seed, val_fraction)

    def done(self, used: dict[str, int]) -> bool:
        """True when no further document of this domain can add a block (reading may stop)."""
        train_done = self.train is not None and used["train"] >= self.train
        if self.val is None:
            val_done = train_done and bool(self.train)
        else:
            val_done = used["val"] >= self.val
        return train_done and val_done


@dataclass
class BuildPlan:
    """Everything that decides the corpus' content (and so its fingerprint)."""

    sources: list[SourceSpec]
    block_size: int
    val_fraction: float
    seed: int
    budgets: dict[str, DomainBudget] = field(default_factory=dict)
    default_budget: DomainBudget = field(default_factory=DomainBudget)
    limit_docs: int | None = None
    recipe: str | None = None
    _resolved: dict[int, SourceListing] = field(default_factory=dict, repr=False)

    def budget(self, domain: str) -> DomainBudget:
        return self.budgets.get(domain, self.default_budget)

    def files(self, index: int) -> SourceListing:
        """Root, files and skipped entries of source ``index``, listed once per build (listing a big tree
        is slow)."""
        if index not in self._resolved:
            self._resolved[index] = resolve_files(self.sources[index])
        return self._resolved[index]

    def documents(self, index: int) -> Iterator[Document | SourceIssue]:
        """Documents (and file issues) of source ``index``, at most ``limit_docs`` documents."""
        return _limited(iter_documents(self.sources[index], self.files(index)), self.limit_docs)


def _to_blocks(tokens: int | None, block_size: int, what: str) -> int | None:
    if tokens is None:
        return None
    if 0 < tokens < block_size:
        raise ValueError(f"{what}={tokens} is smaller than one block ({block_size} tokens)")
    return tokens // block_size


def _cap(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def make_plan(
    *,
    source: str | Sequence[str] | None,
    recipe: str | Path | Recipe | None,
    domain_sources: dict[str, str] | None,
    domain: str | None,
    text_field: str,
    domain_field: str | None,
    id_field: str | None,
    block_size: int | None,
    limit_docs: int | None,
    max_tokens: int | str | None,
    val_fraction: float | None,
    val_tokens: int | str | None,
    seed: int | None,
) -> tuple[BuildPlan, Recipe | None]:
    """Turn the user's options (and recipe, if any) into a :class:`BuildPlan`, validating every value."""
    max_tok = parse_count(max_tokens, "max_tokens")
    val_tok = parse_count(val_tokens, "val_tokens")
    if limit_docs is not None and limit_docs < 1:
        raise ValueError(f"limit_docs must be >= 1, got {limit_docs}")
    if max_tok == 0:
        raise ValueError("max_tokens must be > 0 (it caps the training tokens per domain)")
    rec: Recipe | None = None
    if recipe is not None:
        if source is not None:
            raise ValueError("give either a recipe or a source, not both (a recipe names its own sources)")
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, domain_sources=domain_sources)
    elif domain_sources:
        raise ValueError("domain_sources (--domain-source) only applies to a recipe build")
    bs = block_size or (rec.block_size if rec else DEFAULT_BLOCK_SIZE)
    if not isinstance(bs, int) or bs < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {bs!r}")
    vf = val_fraction if val_fraction is not None else (rec.val_fraction if rec else DEFAULT_VAL_FRACTION)
    if not 0.0 <= vf <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {vf}")
    sd = seed if seed is not None else (rec.seed if rec else 0)
    plan = BuildPlan(sources=[], block_size=bs, val_fraction=float(vf), seed=int(sd), limit_docs=limit_docs)
    if rec is not None:
        plan.recipe = rec.path or rec.name
        for d in rec.domains:
            match = d.match if d.match is not None else (d.name if d.domain_field else None)
            plan.sources.append(SourceSpec(d.source, d.name, d.text_field, d.domain_field, match, d.id_field))
            plan.budgets[d.name] = DomainBudget(
                train=_cap(
                    _to_blocks(d.train_tokens, bs, f"recipe domain {d.name} train_tokens"),
                    _to_blocks(max_tok, bs, "max_tokens"),
                ),
                val=_cap(
                    _to_blocks(d.val_tokens, bs, f"recipe domain {d.name} val_tokens"),
                    _to_blocks(val_tok, bs, "val_tokens"),
                ),
            )
    else:
        paths = (
            ["stdlib"] if source is None else ([source] if isinstance(source, str | Path) else list(source))
        )
        if not paths:
            raise ValueError("no source given")
        for p in paths:
            plan.sources.append(SourceSpec(str(p), domain, text_field, domain_field, None, id_field))
        plan.default_budget = DomainBudget(
            train=_to_blocks(max_tok, bs, "max_tokens"), val=_to_blocks(val_tok, bs, "val_tokens")
        )
    return plan, rec


def _limited(items: Iterable[Document | SourceIssue], limit: int | None) -> Iterator[Document | SourceIssue]:
    """Pass issues through; stop after ``limit`` documents."""
    seen = 0
    for item in items:
        if isinstance(item, Document):
            if limit is not None and seen >= limit:
                return
            seen += 1
        yield item
