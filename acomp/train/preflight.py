"""Checks that the corpus fits the run, made before the first training step.

A wrong corpus must stop the run with one error that names the thing (docs/RELIABILITY.md), not fail deep
inside step 1 or, worse, train on data the model reads differently: another tokenizer's ids, other block
sizes, or (on resume) a data-loader position that belongs to another corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from acomp.config import ConfigError, RunConfig
from acomp.train.data import Corpus, DataError
from acomp.train.segments import segment_position_budget, split_substeps

# Files that make a model directory carry its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
            got = corpus.manifest["block_size"]
            raise DataError(f"{where}: {e}: data.block_size={got}, or null to take the corpus' own") from None
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


def missing_model_dir(name: str) -> bool:
    """True when `name` means a local directory and there is none: it is not of a hub id's form (`name` or
    `org/name`; transformers would report it as a malformed repo id), or it is `dir/name` under an existing
    local directory `dir` (e.g. runs/tiny: transformers would try the hub, retrying for half a minute offline)."""
    looks_local = name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1
    under_local_dir = name.count("/") == 1 and Path(name.split("/")[0]).is_dir()
    return (looks_local or under_local_dir) and not Path(name).exists()


def check_model_source(cfg: RunConfig) -> None:
    name = cfg.model.name_or_path
    if name is not None and missing_model_dir(name):
        raise ConfigError(f"model.name_or_path={name!r}: no such model directory")


def short_reason(error: Exception) -> str:
    """The first sentence of an error (transformers' load errors run on with hints and lists of model types)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first.split(". ")[0].rstrip(".")


def model_source_error(name: str, error: Exception) -> ConfigError:
    """A failure to load model.name_or_path's config as one line naming it."""
    first = short_reason(error)
    where = (
        "neither a local model directory nor a model on the Hugging Face hub"
        if not Path(name).exists()
        else "unreadable"
    )
    return ConfigError(f"model.name_or_path={name!r}: {where} ({first})")


def position_budget(cfg: RunConfig, model_config) -> int:
    """The longest segment the model's positions allow (acomp.train.segments.segment_position_budget), or a
    config error naming the compression settings that leave no room."""
    try:
        return segment_position_budget(model_config, cfg.compression)
    except ValueError as e:
        c = cfg.compression
        # The key that sets one segment's summary positions in this mode.
        key = "summary_length" if c.compression_mode == "fixed" else "compression_max_len"
        raise ConfigError(
            f"compression.{key}={getattr(c, key)} (compression_mode={c.compression_mode}, "
            f"{c.training_substeps} substeps x {c.segments_per_substep} segments) does not fit the model: {e}; "
            f"lower compression.{key} or the number of segments"
        ) from None


def check_segments(cfg: RunConfig, block_size: int, max_segment: int) -> None:
    """Cut one block the way every step will (same code, dummy ids): fails now if it cannot be cut, or if a
    fixed segment is longer than the model's positions leave room for."""
    c = cfg.compression
    if not c.randomize_segments and max(c.segment_lengths) > max_segment:
        raise ConfigError(
            f"compression.segment_lengths={list(c.segment_lengths)} has a segment of {max(c.segment_lengths)} "
            f"tokens, but the model's positions leave room for {max_segment} per segment (its "
            f"max_position_embeddings less the summary positions of one sequence; see "
            f"compression.summary_length, or set compression.max_segment_length)"
        )
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


def corpus_identity(corpus: Corpus) -> dict:
    """What identifies the run's corpus (acomp.data.manifest.corpus_identity of data.path as given): recorded
    when the run starts, written into every checkpoint as corpus.json, compared on resume and before export."""
    from acomp.data.manifest import corpus_identity as identity

    return identity(corpus.source, corpus.manifest)


def check_resumed_corpus(checkpoint: Path, corpus: Corpus) -> None:
    """Resuming restores the model and the data-loader position: both belong to the checkpoint's corpus.
    Keys a checkpoint's corpus.json lacks (written by an older acomp, e.g. corpus_id) are not compared."""
    from acomp.data.manifest import identity_difference
    from acomp.train.checkpoint import Checkpointer

    saved = Checkpointer.corpus_of(checkpoint)
    if saved is None:
        return  # written before checkpoints recorded their corpus
    difference = identity_difference(saved, corpus_identity(corpus))
    if difference is not None:
        key, old, new = difference
        raise DataError(
            f"data.path={corpus.source!r} is another corpus than the one checkpoint {checkpoint} was trained "
            f"on ({saved.get('path')}): {key} {new!r} != {old!r}. Resume with that corpus, or start a new run "
            f"from the exported weights (model.name_or_path) in another train.output_dir"
        )


def check_corpus_unchanged(corpus: Corpus, recorded: dict) -> None:
    """data.path still holds the corpus this run started from: a `build_corpus --overwrite` (or an upload
    over a remote corpus) meanwhile would ship the new corpus' tokenizer with weights trained on the old ids.
    A remote corpus is checked against its manifest in the store, not the local cache."""
    from acomp.data import RemoteError
    from acomp.data.manifest import MANIFEST_NAME, CorpusChangedError, check_same_corpus

    try:
        if corpus.uri is None:
            check_same_corpus(corpus.path, recorded, since="this run started")
            return
        from acomp.data.remote import open_remote

        remote = open_remote(corpus.uri)
        raw = remote.get(MANIFEST_NAME)
        if raw is None:
            raise FileNotFoundError(
                f"no corpus at {corpus.uri} any more ({remote.url(MANIFEST_NAME)} is gone)"
            )
        manifest = json.loads(raw)
        check_same_corpus(corpus.uri, recorded, since="this run started", manifest=manifest)
    except CorpusChangedError as e:
        raise CorpusChangedDataError(str(e)) from None
    except (OSError, ValueError, KeyError, RemoteError) as e:
        raise CorpusChangedDataError(
            f"cannot read the corpus at data.path={corpus.source!r} again to check it is the one this run "
            f"started from: {e}"
        ) from None


class CorpusChangedDataError(DataError):
    """data.path no longer holds the corpus the run started from (checked before export)."""


def check_resume_config(cfg: RunConfig, checkpoint: Path) -> None:
    """The settings that shape the model's parameters must be those the checkpoint was trained with;
    otherwise loading fails deep inside DeepSpeed (or, for a pretrained base, loads weights of another
    shape). Checked from the checkpoint's config.yaml before anything is built."""
    for key, old, new in config_differences(cfg, checkpoint, _shape_keys(cfg)):
        raise ConfigError(
            f"{key} is {new!r} but checkpoint {checkpoint} was trained with {old!r}: resuming needs the same "
            f"model shape. Set it back, or start a new run in another train.output_dir"
        )


def changed_settings(cfg: RunConfig, checkpoint: Path, keys: tuple[str, ...]) -> list[str]:
    """`key old -> new` for each of `keys` whose value differs from the checkpoint's config.yaml."""
    return [f"{key} {old!r} -> {new!r}" for key, old, new in config_differences(cfg, checkpoint, keys)]


def config_differences(cfg: RunConfig, checkpoint: Path, keys) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this config's value) for each of `keys` (`section.name`) that differs from
    the checkpoint's config.yaml; a mapping (model.arch) names its first differing entry. Nothing when the
    checkpoint has no readable config.yaml or lacks the key (an older acomp)."""
    import yaml

    try:
        saved = yaml.safe_load((Path(checkpoint) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    now, found = cfg.to_dict(), []
    for key in keys:
        section, name = key.split(".")
        old = (saved.get(section) or {}).get(name, _MISSING)
        new = now[section][name]
        if old is _MISSING or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            sub = sorted(k for k in {*old, *new} if old.get(k, _MISSING) != new.get(k, _MISSING))[0]
            key, old, new = f"{key}.{sub}", old.get(sub, "(unset)"), new.get(sub, "(unset)")
        found.append((key, old, new))
    return found


_MISSING = object()


def _shape_keys(cfg: RunConfig) -> list[str]:
    """Config keys that change the model's parameters (a pretrained base's own config is checked at load)."""
    keys = ["model.family", "model.arch"] if cfg.model.name_or_path is None else []
    keys.append("compression.compression_mode")
    if cfg.compression.compression_mode == "variable":
        keys.append("compression.compression_max_len")
    else:
        keys.append("compression.summary_length")
    keys.append("lora.enabled")
    if cfg.lora.enabled:
        keys += ["lora.r", "lora.target_modules", "lora.modules_to_save"]
    return keys


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
