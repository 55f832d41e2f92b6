"""Attention kernel selection: SDPA by default (cudnn first on Hopper), flash-attn 2 when asked for.

Measured on H100 (shared/spec/baselines.md): SDPA's cudnn backend runs causal attention 1.6x faster
than its default flash backend, so on capability >= 9.0 we put it first in torch's priority list.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_ORDER = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION],
    "math": [],
}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str | None) -> str:
    """'sdpa' (default), 'eager', or 'flash_attention_2' (only when flash-attn is importable)."""
    if requested in (None, "sdpa"):
        return "sdpa"
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU "
                "(pip install 'acomp[flash]'); use 'sdpa' otherwise"
            )
        return requested
    if requested == "eager":
        return requested
    raise ValueError(f"attn_implementation must be 'sdpa', 'flash_attention_2' or 'eager', got {requested!r}")


def sdpa_context(backend: str = "auto", device: torch.device | None = None):
    """A context that makes SDPA try `backend` first (falling back to the others, then math)."""
    if backend == "auto":
        on_hopper = (
            device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        )
        if not on_hopper:
            return contextlib.nullcontext()
        backend = "cudnn"
    if device is None or device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(_ORDER[backend] + [SDPBackend.MATH], set_priority=True)
