"""Checks that the corpus fits the run, made before the first training step.

A wrong corpus must stop the run with one error that names the thing (docs/RELIABILITY.md), not fail deep
inside step 1 or, worse, train on data the model reads differently: another tokenizer's ids, other block
sizes, or (on resume) a data-loader position that belongs to another corpus.
"""

from __future__ import annotations

from pathlib import Path

import torch

from acomp.config import ConfigError, RunConfig
from acomp.train.data import Corpus, DataError
from acomp.train.segments import split_substeps

# Files that make a model directory carry its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def corpus_identity(corpus: Corpus) -> dict:
    """What a checkpoint records about its corpus (checkpoints/<tag>/corpus.json)."""
    m = corpus.manifest
    return {
        "path": corpus.source,
        "tokenizer_sha256": (m.get("tokenizer") or {}).get("sha256"),
        "vocab_size": m["vocab_size"],
        "block_size": m["block_size"],
        "fingerprint": m.get("fingerprint"),
    }


def check_corpus(cfg: RunConfig, corpus: Corpus) -> None:
    """Block size as configured, a training split with at least one global batch, a validation split when
    periodic evaluation is on, shard files of the recorded sizes (the cheap check, before the model is
    built; `data.verify: hash` recomputes checksums later, when the datasets open)."""
    from acomp.data import check_manifest, verify_shards

    where = f"data.path={corpus.source!r}"
    if cfg.data.block_size is not None:
        try:
            check_manifest(corpus.manifest, block_size=cfg.data.block_size)
        except ValueError as e:
            raise DataError(f"{where}: {e} (data.block_size={cfg.data.block_size})") from None
    splits = corpus.manifest["splits"]
    train = splits.get("train", {}).get("blocks", 0)
    if train == 0:
        raise DataError(f"{where}: the corpus is empty: its train split has 0 blocks (see its manifest.json)")
    if train < cfg.train.global_batch_size:
        raise DataError(
            f"{where}: the train split has {train} blocks, fewer than one step needs "
            f"(train.global_batch_size={cfg.train.global_batch_size})"
        )
    if cfg.train.eval_every:
        split = cfg.data.val_split
        if not splits.get(split, {}).get("blocks", 0):
            raise DataError(
                f"{where}: data.val_split={split!r} is missing or empty, but train.eval_every="
                f"{cfg.train.eval_every} evaluates on it (set train.eval_every=0 or rebuild with a val split)"
            )
    if cfg.data.verify != "none" and corpus.uri is None:  # a remote corpus' shards are checked as they arrive
        for split in ["train", cfg.data.val_split] if cfg.train.eval_every else ["train"]:
            try:
                verify_shards(corpus.path / split, "size")  # CorruptShardError names the shard file
            except FileNotFoundError as e:
                raise DataError(f"{where}: {e}") from None


def check_segments(cfg: RunConfig, block_size: int, max_segment: int) -> None:
    """Cut one block the way every step will (same code, dummy ids): fails now if it cannot be cut."""
    ids = torch.zeros(1, block_size, dtype=torch.long)
    try:
        split_substeps(ids, cfg.compression, max_segment, torch.Generator().manual_seed(0))
    except ValueError as e:
        raise ConfigError(
            f"the corpus blocks ({block_size} tokens, data.path={cfg.data.path!r}) do not fit the compression "
            f"settings: {e}"
        ) from None


def check_tokenizer(cfg: RunConfig, corpus: Corpus, base_vocab_size: int) -> None:
    """A pretrained model must read the corpus ids as its own tokenizer wrote them.

    With the model's tokenizer at hand, every one of its tokens must have the same id in the corpus
    tokenizer (which may add acomp's control tokens after them). Without it, the corpus may add at most
    the control tokens to the model's vocabulary. Fresh models are built from the corpus tokenizer.
    """
    from acomp.data import CONTROL_TOKENS

    name = cfg.model.name_or_path
    if name is None:
        return
    where = f"data.path={corpus.source!r}"
    model_tokenizer = _load_tokenizer(name)
    if model_tokenizer is None:
        extra = corpus.vocab_size - base_vocab_size
        if extra > len(CONTROL_TOKENS):
            raise DataError(
                f"{where} was tokenized with {corpus.vocab_size} tokens but model.name_or_path={name!r} has "
                f"{base_vocab_size}: {extra} more than the {len(CONTROL_TOKENS)} control tokens acomp adds, so "
                f"it is not the model's tokenizer; rebuild the corpus with --tokenizer {name}"
            )
        return
    model_vocab = model_tokenizer.get_vocab()
    corpus_vocab = corpus.tokenizer.get_vocab()
    wrong = [(tok, i, corpus_vocab.get(tok)) for tok, i in model_vocab.items() if corpus_vocab.get(tok) != i]
    if wrong:
        tok, i, j = sorted(wrong, key=lambda w: w[1])[0]
        seen = "is missing" if j is None else f"is id {j}"
        raise DataError(
            f"{where} was tokenized with a different tokenizer than model.name_or_path={name!r}: "
            f"{len(wrong)} of the model's {len(model_vocab)} tokens differ (e.g. {tok!r}: id {i} in the "
            f"model's tokenizer, {seen} in the corpus'); rebuild the corpus with --tokenizer {name}"
        )


def check_resumed_corpus(checkpoint: Path, corpus: Corpus) -> None:
    """Resuming restores the model and the data-loader position: both belong to the checkpoint's corpus."""
    from acomp.train.checkpoint import Checkpointer

    saved = Checkpointer.corpus_of(checkpoint)
    if saved is None:
        return  # written before checkpoints recorded their corpus
    now = corpus_identity(corpus)
    for key, what in (
        ("tokenizer_sha256", "tokenizer"),
        ("block_size", "block size"),
        ("fingerprint", "content (fingerprint)"),
    ):
        if saved.get(key) != now.get(key):
            raise DataError(
                f"data.path={corpus.source!r} has another {what} than the corpus checkpoint {checkpoint} "
                f"was trained on ({saved.get('path')}): {key} {now.get(key)!r} != {saved.get(key)!r}. Resume "
                f"with that corpus, or start a new run from the exported weights (model.name_or_path) with "
                f"train.resume=never"
            )


def _load_tokenizer(name: str):
    """The model's own tokenizer, or None when it has none (a bare weights directory, or hub offline)."""
    from transformers import AutoTokenizer

    path = Path(name)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception:  # cannot be loaded here (no files, offline, a slow-only class): the size check applies
        return None
