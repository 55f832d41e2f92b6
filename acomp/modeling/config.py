"""Compression fields that an AutoCompressor adds to its base model's transformers config.

They live on the base config object itself (as in the released checkpoints), so a checkpoint's
config.json is the base model's plus these keys and the plain base class still loads it.
"""

from __future__ import annotations

from typing import Any

COMPRESSION_DEFAULTS: dict[str, Any] = {
    # Fixed-length summaries (the paper).
    "summary_length": 50,  # summary tokens per segment; 0 turns compression off
    "accumulate_summary": True,  # softprompt for segment k = summaries of all segments < k
    "segment_gradient_checkpointing": False,  # recompute each segment but the last in backward
    # Variable-length compression (issue 5). Reserved here so configs round-trip from day one.
    "compression_mode": "fixed",  # "fixed" or "variable"
    "compression_max_len": 8,
    "compression_lambda": 0.0,
    "compression_alpha": 1.0,
    "compress_stop_threshold": None,
    # Which SDPA kernel to try first: "auto" (cudnn on Hopper+, else torch's order), "cudnn", "flash",
    # "efficient", "math". Ignored by flash_attention_2 / eager.
    "sdpa_backend": "auto",
    # Loss without full logits: when the caller does not ask for logits (return_logits=False, as the trainer
    # does), the LM head and cross-entropy run over at most this many tokens at a time, each chunk
    # checkpointed, so no [tokens, vocab] logits are kept for backward. 0 = one pass over all tokens.
    "loss_chunk_size": 4096,
}

COMPRESSION_MODES = ("fixed", "variable")
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def apply_compression_fields(config, **overrides):
    """Fill in missing compression fields with defaults, apply overrides, and validate. Returns config."""
    unknown = sorted(k for k in overrides if k not in COMPRESSION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown compression field(s) {unknown}; known: {sorted(COMPRESSION_DEFAULTS)}")
    for key, default in COMPRESSION_DEFAULTS.items():
        if key in overrides and overrides[key] is not None:
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
    if config.sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be one of {SDPA_BACKENDS}, got {config.sdpa_backend!r}")
    c = config.loss_chunk_size
    if not isinstance(c, int) or isinstance(c, bool) or c < 0:
        raise ValueError(f"loss_chunk_size must be an integer >= 0 (0 = no chunking), got {c!r}")
    m = config.compression_max_len
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"compression_max_len must be an integer >= 1, got {m!r}")
    t = config.compress_stop_threshold
    if t is not None and not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"compress_stop_threshold must be None or in [0, 1], got {t!r}")
