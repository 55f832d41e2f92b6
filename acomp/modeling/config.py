"""Compression fields that an AutoCompressor adds to its base model's transformers config.

They live on the base config object itself (as in the released checkpoints), so a checkpoint's
config.json is the base model's plus these keys and the plain base class still loads it. The dataclasses
below are the one declaration of these fields and their defaults: the run config (acomp/config.py) extends
them, and `COMPRESSION_DEFAULTS` is derived from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .attention import PRESENCE_ATTENTION, SDPA_BACKENDS

COMPRESSION_MODES = ("fixed", "variable")
SUMMARY_INITS = ("eos", "normal")
STOP_RULES = ("step", "cumulative")
TRAINING_PRESENCE = ("soft", "sampled")


@dataclass
class CompressionFields:
    """How a model compresses: what a checkpoint's config.json records."""

    summary_length: int = 50  # summary tokens (= summary vectors) per segment, kappa in the paper; 0 = off
    accumulate_summary: bool = True  # softprompt of segment k = summaries of all segments < k (else the last)
    segment_gradient_checkpointing: bool = True  # recompute each segment but the last of a call in backward
    # A new summary table (no embed_summary.weight in the checkpoint): eos = every row the EOS embedding
    # (the paper) | normal = rows drawn from N(0, the base's init std) (what the original ran in effect).
    summary_init: str = "eos"
    # Variable-length compression (docs/VARIABLE_LENGTH.md).
    compression_mode: str = "fixed"  # fixed | variable
    compression_max_len: int = 8  # compression slots per segment (variable mode)
    compression_lambda: float = 0.0  # weight of the length penalty
    compression_alpha: float = 1.0  # the penalty is lambda * E[L] / (alpha * n text tokens)
    compress_stop_threshold: float | None = None  # inference stop threshold (None: see compress_stop_rule)
    # What the threshold reads at inference: cumulative = the probability 1 - S_(t+1) that the loop has
    # stopped by slot t (None threshold: 0.5, the median of the length distribution training priced) |
    # step = slot t's own stop probability p_t (None threshold: <eoc> is the slot's argmax token).
    compress_stop_rule: str = "cumulative"
    # Training: how the next segments see a segment's uncertain vectors. sampled = a length drawn per segment
    # from the stop distribution, the slots beyond it absent, gradients straight through log S_t (training
    # sees a slot as inference does: kept or not) | soft = every slot, its attention weighted by its survival
    # S_t (attention can still read faint slots that inference drops). docs/VARIABLE_LENGTH.md.
    training_presence: str = "sampled"


@dataclass
class KernelFields:
    """How a model computes: kernel choices that leave results unchanged (also stored on the config)."""

    # SDPA kernel tried first: auto (training with random segment boundaries: flash; otherwise cudnn on
    # Hopper and newer) | cudnn | flash | efficient | math. Ignored by flash_attention_2 / eager.
    sdpa_backend: str = "auto"
    # The loss runs the LM head + cross-entropy over at most this many tokens at a time (each chunk
    # checkpointed), so [tokens, vocab] logits are never kept for backward; 0 = all tokens at once.
    loss_chunk_size: int = 4096
    # Variable-length mode: how the softprompt's presence bias reaches attention. mask = a 4D additive mask
    # (SDPA's efficient / math kernels, or eager) | folded = one extra key dimension, so causal flash / cudnn
    # run it (SDPA only) | auto = folded under SDPA, else mask.
    presence_attention: str = "auto"


COMPRESSION_DEFAULTS: dict[str, Any] = {
    **dataclasses.asdict(CompressionFields()),
    **dataclasses.asdict(KernelFields()),
}


def config_fields(obj) -> dict[str, Any]:
    """The model-config fields of a run-config section that extends CompressionFields or KernelFields."""
    return {name: getattr(obj, name) for name in COMPRESSION_DEFAULTS if hasattr(obj, name)}


def init_std(config) -> float:
    """The base model's weight-init std: `initializer_range` (Llama family) or `init_std` (OPT)."""
    for key in ("initializer_range", "init_std"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    return 0.02


def apply_compression_fields(config, **overrides):
    """Fill in missing compression fields with defaults, apply overrides, and validate. Returns config.
    Every override given is applied, None too (compress_stop_threshold=None: stop at the argmax)."""
    unknown = sorted(k for k in overrides if k not in COMPRESSION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown compression field(s) {unknown}; known: {sorted(COMPRESSION_DEFAULTS)}")
    for key, default in COMPRESSION_DEFAULTS.items():
        if key in overrides:
            setattr(config, key, overrides[key])
        elif not hasattr(config, key):
            setattr(config, key, default)
    validate_compression_fields(config)
    return config


def validate_compression_fields(config) -> None:
    k = config.summary_length
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"summary_length must be an integer >= 0, got {k!r}")
    if config.compression_mode not in COMPRESSION_MODES:
        raise ValueError(
            f"compression_mode must be one of {COMPRESSION_MODES}, got {config.compression_mode!r}"
        )
    if config.summary_init not in SUMMARY_INITS:
        raise ValueError(f"summary_init must be one of {SUMMARY_INITS}, got {config.summary_init!r}")
    if config.training_presence not in TRAINING_PRESENCE:
        raise ValueError(
            f"training_presence must be one of {TRAINING_PRESENCE}, got {config.training_presence!r}"
        )
    if config.sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be one of {SDPA_BACKENDS}, got {config.sdpa_backend!r}")
    if config.presence_attention not in PRESENCE_ATTENTION:
        raise ValueError(
            f"presence_attention must be one of {PRESENCE_ATTENTION}, got {config.presence_attention!r}"
        )
    c = config.loss_chunk_size
    if not isinstance(c, int) or isinstance(c, bool) or c < 0:
        raise ValueError(f"loss_chunk_size must be an integer >= 0 (0 = no chunking), got {c!r}")
    m = config.compression_max_len
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"compression_max_len must be an integer >= 1, got {m!r}")
    if not float(config.compression_lambda) >= 0.0:
        raise ValueError(f"compression_lambda must be >= 0, got {config.compression_lambda!r}")
    if not float(config.compression_alpha) > 0.0:
        raise ValueError(f"compression_alpha must be > 0, got {config.compression_alpha!r}")
    t = config.compress_stop_threshold
    if t is not None and not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"compress_stop_threshold must be None or in [0, 1], got {t!r}")
    if config.compress_stop_rule not in STOP_RULES:
        raise ValueError(f"compress_stop_rule must be one of {STOP_RULES}, got {config.compress_stop_rule!r}")
