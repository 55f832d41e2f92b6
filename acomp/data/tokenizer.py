"""Tokenizer for a corpus: load a given one or train a byte-level BPE, and register the control tokens.

AutoCompressors with the variable-length extension need two control tokens in the vocabulary: ``<sum>``
(triggers compression) and ``<eoc>`` (ends the compression loop). They are registered as additional special
tokens here, at corpus-build time, so the corpus' ``vocab_size`` already counts them and the model resizes
its embeddings once. The corpus itself never contains them: documents are encoded with
``encode_special_tokens`` on, so a literal ``"<sum>"`` in source text becomes ordinary tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SUM_TOKEN = "<sum>"
EOC_TOKEN = "<eoc>"
CONTROL_TOKENS = {"sum": SUM_TOKEN, "eoc": EOC_TOKEN}
TRAINED_EOS = "<|endoftext|>"
TRAINED_PAD = "<pad>"
_STANDARD_ROLES = ("bos", "eos", "pad", "unk")


def min_trained_vocab() -> int:
    """Smallest BPE vocabulary we train: 256 byte symbols, the special tokens and at least one merge."""
    return 256 + 4 + 1


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, show_progress: bool = True
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE (lossless on any text) with the control tokens built in."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < min_trained_vocab():
        raise ValueError(
            f"train_tokenizer_vocab={vocab_size} is too small: a byte-level BPE needs at least "
            f"{min_trained_vocab()} (256 bytes + 4 special tokens + 1 merge)"
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[TRAINED_EOS, TRAINED_PAD, SUM_TOKEN, EOC_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=TRAINED_EOS,
        eos_token=TRAINED_EOS,
        unk_token=TRAINED_EOS,
        pad_token=TRAINED_PAD,
        additional_special_tokens=[SUM_TOKEN, EOC_TOKEN],
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer with AutoTokenizer; the pipeline needs the fast (Rust) one for batch encoding."""
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    except Exception as err:  # transformers raises OSError/ValueError/... depending on what is missing
        raise ValueError(
            f"could not load tokenizer {str(name_or_path)!r} ({type(err).__name__}: {err}). "
            f"Give a local directory with tokenizer files, or --train-tokenizer VOCAB to train one"
        ) from err
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"tokenizer {str(name_or_path)!r} has no fast (Rust) version; the pipeline needs one"
        )
    return tok


def register_control_tokens(tok: PreTrainedTokenizerFast) -> None:
    """Add ``<sum>`` and ``<eoc>`` as additional special tokens (a no-op when already present)."""
    present = set(tok.additional_special_tokens)
    missing = [t for t in CONTROL_TOKENS.values() if t not in present]
    if missing:
        tok.add_special_tokens(
            {"additional_special_tokens": missing}, replace_additional_special_tokens=False
        )


def special_tokens(tok: PreTrainedTokenizerFast) -> tuple[dict[str, str], dict[str, int]]:
    """Role -> token string and role -> id, for the control tokens and bos/eos/pad/unk where they exist."""
    names: dict[str, str] = {}
    for role in _STANDARD_ROLES:
        value = getattr(tok, f"{role}_token", None)
        if value is not None:
            names[role] = str(value)
    names.update(CONTROL_TOKENS)
    ids = {role: int(tok.convert_tokens_to_ids(token)) for role, token in names.items()}
    return names, ids


def backend_json(tok: PreTrainedTokenizerFast) -> str:
    """The Rust tokenizer serialised (vocab, merges, added tokens): what workers rebuild and what we hash."""
    return tok.backend_tokenizer.to_str()


def tokenizer_sha256(tok: PreTrainedTokenizerFast) -> str:
    """Identity of a tokenizer's behaviour, independent of how its files are laid out."""
    return hashlib.sha256(backend_json(tok).encode("utf-8")).hexdigest()
