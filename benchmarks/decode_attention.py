"""One decode step's attention against a static KV cache, kernel by kernel: which way of computing it reads
the cache fastest, at the batch sizes and cache lengths of benchmarks/inference.py.

Llama-1B's attention shape (32 query heads over 4 KV heads of 64), bf16, one new token per sequence, a key
mask [B, 1, 1, L] as the static cache needs (future columns closed). Ways, each timed with CUDA events over
`--iters` calls after a warm-up:
- `sdpa_grouped`: what `decoding="static"` runs (attention.grouped_decode_attention): the 8 query heads of a
  KV head as 8 query rows, one masked SDPA call, SDPA's own backend choice under acomp's cudnn-first order;
- `sdpa_grouped_efficient`: the same with the memory-efficient backend forced;
- `matmul`: scores = Q K^T by cuBLAS, fp32 softmax with the mask, then P V;
- `matmul_compiled`: the same under torch.compile (what `compile_step=True` traces);
- `flash_unmasked`: SDPA with `enable_gqa` over exactly the filled length, no mask (flash's split-KV
  decode kernel): not usable in a fixed-shape step, shown as the reference a masked kernel should reach.
Reports microseconds per call and the cache read rate (K and V bytes / time).

    python benchmarks/decode_attention.py --out $OUT/decode_attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import write_report  # noqa: E402

from acomp.modeling.attention import backend_context, grouped_matmul_attention, sdpa_context  # noqa: E402

HEADS, KV_HEADS, DIM = 32, 4, 64


def sdpa_grouped(rows, key, value, bias):
    return F.scaled_dot_product_attention(rows, key, value, attn_mask=bias)


def matmul(rows, key, value, bias):
    """What the compiled decode step runs (attention.grouped_matmul_attention)."""
    return grouped_matmul_attention(rows, key, value, bias, DIM**-0.5)


def time_call(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters  # microseconds


def measure(length: int, batch: int, iters: int, compiled, device) -> dict:
    """One row: every way at one filled cache length and batch size."""
    capacity = -(-(length + 256) // 16) * 16  # the static cache: filled part + room for new tokens
    g = torch.Generator(device=device).manual_seed(0)
    key = torch.randn(batch, KV_HEADS, capacity, DIM, device=device, dtype=torch.bfloat16, generator=g)
    value = torch.randn_like(key)
    rows = torch.randn(batch, KV_HEADS, HEADS // KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    bias = torch.full((batch, 1, 1, capacity), torch.finfo(torch.bfloat16).min, device=device)
    bias[..., :length] = 0
    bias = bias.to(torch.bfloat16)
    query = rows.reshape(batch, HEADS, 1, DIM)
    k_used, v_used = key[:, :, :length], value[:, :, :length]
    ways = {
        "sdpa_grouped": (sdpa_context("auto", device), lambda: sdpa_grouped(rows, key, value, bias)),
        "sdpa_grouped_efficient": (
            backend_context("efficient"),
            lambda: sdpa_grouped(rows, key, value, bias),
        ),
        "matmul": (contextlib.nullcontext(), lambda: matmul(rows, key, value, bias)),
        "matmul_compiled": (contextlib.nullcontext(), lambda: compiled(rows, key, value, bias)),
        "flash_unmasked": (
            sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
            lambda: F.scaled_dot_product_attention(query, k_used, v_used, enable_gqa=True),
        ),
    }
    reference = matmul(rows, key, value, bias).float()
    row = {"length": length, "batch": batch, "cache_bytes": 2 * k_used.numel() * 2}
    for name, (context, fn) in ways.items():
        try:
            with context:
                out = fn()
                if name != "flash_unmasked":
                    row[f"{name}_max_err"] = (out.float() - reference).abs().max().item()
                row[f"{name}_us"] = time_call(fn, iters)
                row[f"{name}_gb_s"] = row["cache_bytes"] / row[f"{name}_us"] / 1e3
        except Exception as e:  # a backend that cannot run this call
            row[f"{name}_us"] = None
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 128])
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[448, 6448, 31008], help="filled cache lengths (keys)"
    )
    p.add_argument("--iters", type=int, default=50, help="timed calls per way (after 3 warm-up calls)")
    p.add_argument("--out", default=None, help="write all rows to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    compiled = torch.compile(matmul, dynamic=False)
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, 64
    )  # one graph per shape
    rows_out = []
    for length in args.lengths:
        for batch in args.batch_sizes:
            rows_out.append(measure(length, batch, args.iters, compiled, device))
            print(json.dumps(rows_out[-1]), flush=True)
            torch.cuda.empty_cache()
    write_report(rows_out, args.out)


if __name__ == "__main__":
    main()
