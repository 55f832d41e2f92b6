"""Attention kernel selection: SDPA by default (cudnn first on Hopper), flash-attn 2 when asked for.

On Hopper (capability >= 9.0) SDPA's cudnn backend runs causal attention faster than its flash backend on a
fixed shape, so `auto` puts it first in torch's priority list.

Same kernel in forward and in activation-checkpoint recompute. A checkpointed segment runs its forward
twice (once in the forward pass, once in backward), and torch.utils.checkpoint requires both runs to save
tensors of the same shapes. Torch picks the first *enabled* backend of its priority list that can run the
call, and that list is global state that torch itself rewrites once, lazily, at the first SDPA call of the
process (recent CUDA builds put cudnn first on Hopper/Blackwell then; when that first call happens inside
a `sdpa_kernel(..., set_priority=True)` block, the block's order is overwritten for the rest of it and
the block's exit restores the pre-initialisation order). A segment whose forward ran under the rewritten
order (cudnn) and whose recompute ran under ours (flash or efficient) saves tensors of other shapes (the
logsumexp layouts differ), and torch.utils.checkpoint raises CheckpointError. Two guards, so the choice
depends only on the inputs:
- each explicit backend enables just the kernels that follow it in *every* order torch may hold (cudnn:
  cudnn > flash > efficient, as torch's own Hopper order; flash: flash > efficient, cudnn disabled;
  efficient: efficient alone), with math as the last resort;
- torch's lazy one-time initialisation is triggered by a tiny SDPA call outside any context before the
  first context is entered, so the process-wide default stays what torch intends.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# The fused kernels each setting enables, in priority order (math is appended as the last resort). Every
# list is ordered as torch's own default orders order those kernels (cudnn-first: cudnn, flash, efficient;
# otherwise flash, efficient, ..., cudnn), so whichever order torch holds, the first eligible kernel is the same.
_ORDER = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [],
}
SDPA_BACKENDS = ("auto", *_ORDER)  # auto: see sdpa_context
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
_TORCH_PRIORITY_SETTLED: set[int] = set()  # CUDA devices whose lazy SDPA priority initialisation has run


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
    """A context that makes SDPA use `backend` when it can run the call (then the kernels after it in
    `_ORDER`, then math). CUDA only; a no-op elsewhere. See the module docstring for why the same kernel
    is then chosen in a checkpointed segment's forward and in its recompute."""
    if backend == "auto":
        on_hopper = (
            device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        )
        if not on_hopper:
            return contextlib.nullcontext()
        backend = "cudnn"
    if device is None or device.type != "cuda":
        return contextlib.nullcontext()
    settle_torch_sdpa_priority(device)
    return backend_context(backend)


def backend_context(backend: str):
    """The `sdpa_kernel` block for an explicit backend name (no device logic; tests use it on CPU)."""
    return sdpa_kernel(_ORDER[backend] + [SDPBackend.MATH], set_priority=True)


def settle_torch_sdpa_priority(device: torch.device) -> None:
    """Run torch's lazy, once-per-process SDPA priority initialisation now, outside any priority block:
    one tiny SDPA call on `device` with the default settings (once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _TORCH_PRIORITY_SETTLED:
        return
    _TORCH_PRIORITY_SETTLED.add(index)
    try:
        q = torch.zeros(1, 1, 8, 64, device=device, dtype=torch.bfloat16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    except Exception:  # best effort: the backend lists above already make the choice order-independent
        pass


GROUPED_DECODE = "acomp_grouped_decode"
CAUSAL = "acomp_causal"
# How a variable-length softprompt's presence bias reaches attention (folds_presence).
PRESENCE_ATTENTION = ("auto", "mask", "folded")
_FOLD_WIDTH = 8  # extra head dimensions of the folded bias (one used; fused kernels want multiples of 8)
_FOLD_FLOOR = -1.0e4  # exp() of it is 0 in fp32, and a row whose keys are all absent stays finite
_REGISTERED: set[str] = set()


def causal_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, key_bias=None, **kwargs
):
    """Causal SDPA, with an optional additive bias per key, `key_bias` [B, L] (0 = present, very negative =
    absent; it also carries padded keys). The decoder's own mask is ignored: a caller enters
    `causal_attention_block` only when attention is causal apart from `key_bias` (no padding outside it, no
    binding sliding window), and transformers builds no mask for an implementation name it does not know
    (Llama-family decoders pass None; OPT still builds its 4D causal mask), so the causal kernels run with no
    host sync (an all-ones 2D mask costs one `all()` check per call).

    The bias rides in one extra head dimension, q' = [q, 1/scale], k' = [k, bias], so that scale * q'.k' =
    scale * q.k + bias and the causal flash / cudnn kernels run it, where a 4D float mask would need a
    kernel that reads (and in backward writes) a [B, heads, L, L] bias. Its gradient arrives through dK'."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if torch.compiler.is_compiling():
        torch._check(length > 1)  # an unbacked length (compiled layers): SDPA's checks need to know it
    if key_bias is None:  # is_causal without looking at the length (compiled layers may not read it)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=kv_heads != heads
        )
        return out.transpose(1, 2).contiguous(), None
    scale = dim**-0.5 if scaling is None else scaling
    pad = (0, _FOLD_WIDTH - 1)
    unit = query.new_full((batch, heads, length, 1), 1.0 / scale)
    q = torch.nn.functional.pad(torch.cat([query, unit], dim=-1), pad)
    bias = key_bias.clamp(min=_FOLD_FLOOR).to(key.dtype)[:, None, :, None].expand(batch, kv_heads, length, 1)
    k = torch.nn.functional.pad(torch.cat([key, bias], dim=-1), pad)
    v = torch.nn.functional.pad(value, (0, _FOLD_WIDTH))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=kv_heads != heads
    )
    return out[..., :dim].transpose(1, 2).contiguous(), None


def folds_presence(config) -> bool:
    """Whether the presence bias rides folded into the keys: `folded`, or `auto` on an SDPA model (the causal
    flash / cudnn kernels beat the 4D mask's kernel; eager attention takes the mask)."""
    choice = config.presence_attention
    return choice == "folded" or (choice == "auto" and config._attn_implementation == "sdpa")


@contextlib.contextmanager
def causal_attention_block(config):
    """Within the block the model runs `causal_attention` (SDPA models only: the caller checks that)."""
    if CAUSAL not in _REGISTERED:  # once per process
        from transformers import AttentionInterface

        # Through a lambda, so the module attribute is looked up at each call (tests patch it).
        AttentionInterface.register(CAUSAL, lambda *a, **k: causal_attention(*a, **k))
        _REGISTERED.add(CAUSAL)
    previous, config._attn_implementation = config._attn_implementation, CAUSAL
    try:
        yield
    finally:
        config._attn_implementation = previous


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except for one-token decode steps under a key mask [B, 1, 1, L] with
    grouped-query attention: there the query heads that share a KV head become query rows of that head, so
    keys and values are read once instead of being copied per query head. (transformers repeats K/V whenever
    a mask is given, since torch's fused kernels take `enable_gqa` only without one; for a static cache's
    masked decode step that copy costs more than the attention.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    grouped = (
        q_len == 1
        and heads != kv_heads
        and attention_mask is not None
        and attention_mask.ndim == 4
        and attention_mask.shape[1:3] == (1, 1)
    )
    if not grouped:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h uses KV head h // group
    bias = attention_mask[..., : key.shape[-2]]
    if torch.compiler.is_compiling():
        out = grouped_matmul_attention(rows, key, value, bias, dim**-0.5 if scaling is None else scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            rows, key, value, attn_mask=bias, dropout_p=dropout, scale=scaling
        )
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def grouped_matmul_attention(rows, key, value, bias, scaling: float) -> torch.Tensor:
    """Attention as two matmuls and a softmax in fp32 (scale, mask and softmax in fp32 on the matmul's bf16
    scores, as transformers' eager attention), for the compiled decode step: inductor fuses scale, mask and
    softmax and splits the long reduction over the cache, where the masked SDPA call runs one block per
    (sequence, KV head), each scanning the whole cache."""
    scores = torch.matmul(rows, key.transpose(-1, -2)).float() * scaling + bias
    return torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)


@contextlib.contextmanager
def decode_attention(config):
    """Within the block, models that use transformers' SDPA attention run `grouped_decode_attention`."""
    if config._attn_implementation != "sdpa":
        yield
        return
    if GROUPED_DECODE not in _REGISTERED:  # once per process
        from transformers import AttentionInterface

        # Through a lambda, so the module attribute is looked up at each call (tests patch it).
        AttentionInterface.register(GROUPED_DECODE, lambda *a, **k: grouped_decode_attention(*a, **k))
        _REGISTERED.add(GROUPED_DECODE)
    config._attn_implementation = GROUPED_DECODE
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
