"""On torch < 2.12, let inductor's freezing concatenate a grouped-query layer's query/key/value projections.

With frozen weights (`generate(..., freeze_weights=True)`), inductor replaces matmuls that read the same input
with constant weights by one matmul over the concatenated weights. Up to torch 2.11 it asked for equal weight
shapes, so grouped-query attention's query projection (d x d) and key/value projections (d x d_kv) stayed three
GEMMs; torch 2.12 accepts weights that differ only in their output width (pytorch/pytorch#178523). The project
pins torch 2.14; `install()` adds that rule to an older torch (the GPU image has 2.11), so the benchmarks measure
what the pinned torch does. Benchmark-side on purpose: the library relies on torch's own passes only.
"""

from __future__ import annotations

import functools

import torch
from torch.torch_version import TorchVersion


def _weights_differ_only_in_width(match) -> bool:
    weights = [match.kwargs[name] for name in ("w1", "w2", "w3")]
    return all(
        w.op == "get_attr" and w.meta["val"].shape[:-1] == weights[0].meta["val"].shape[:-1] for w in weights
    )


def _three_matmuls(inp, w1, w2, w3):
    return inp @ w1, inp @ w2, inp @ w3


def _one_matmul(inp, w1, w2, w3):
    fused = inp @ torch.cat([w1, w2, w3], dim=1)
    return fused.split([w1.shape[1], w2.shape[1], w3.shape[1]], dim=1)


def install() -> bool:
    """Register the rule with inductor's freezing passes when this torch lacks it; True if it did."""
    if TorchVersion(torch.__version__) >= "2.12":
        return False
    register()
    return True


@functools.cache
def register() -> None:
    """Register the rule (once per process), whatever the torch version."""
    from torch._inductor.fx_passes import freezing_patterns
    from torch._inductor.pattern_matcher import fwd_only, register_replacement

    device = "cuda" if torch.cuda.is_available() else "cpu"
    example = [torch.empty(8, 8, device=device) for _ in range(4)]
    # The second pass runs after torch's own concatenation patterns, which keep their equal-shape matches.
    register_replacement(
        _three_matmuls,
        _one_matmul,
        example,
        fwd_only,
        freezing_patterns.pass_patterns[1],
        extra_check=_weights_differ_only_in_width,
        exclusive_arg_names=("w1", "w2", "w3"),
    )


if __name__ == "__main__":
    raise SystemExit(
        "benchmarks/inductor_gqa_concat.py is a module of benchmarks/inference.py, not a script: run that"
    )
