"""benchmarks/train_throughput.py --smoke: the benchmark's real trainer path (DeepSpeed ZeRO-1/3, LoRA, the
naive baseline) runs end to end on CPU and writes every field the GPU runs report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    meta = report["meta"]
    for key in ("date_utc", "command", "device", "torch", "transformers", "deepspeed", "world_size"):
        assert key in meta, key
    rows = report["results"]
    names = [r["name"] for r in rows]
    assert names == [
        "tiny naive",
        "tiny naive (baselines.md)",
        "tiny zero1 1x3",
        "tiny zero3 1x3",
        "tiny-lora naive",
        "tiny-lora naive (baselines.md)",
        "tiny-lora zero1 1x3",
        "tiny-lora zero3 1x3",
    ]
    for r in rows:
        assert r["status"] == "ok", (r["name"], r["status"])
        for key in ("tokens_per_s", "step_time_s", "mfu", "mfu_palm", "tflops_per_gpu", "tokens_per_step"):
            assert r[key] > 0, (r["name"], key)
        assert "peak_mem_gib" in r and r["loss"] > 0
        assert r["tokens_per_step"] == 2 * 3 * 32  # micro-batch 2 x 3 segments x 32 tokens
        if r["mode"] == "acomp":
            assert r["x_naive"] > 0 and r["x_naive_baselines"] > 0 and r["x_zero1"] > 0
            assert r["flops_per_sequence"] > 0
    lora = next(r for r in rows if r["name"] == "tiny-lora zero3 1x3")
    assert lora["n_params_frozen"] > lora["n_params_trainable"] > 0
    assert lora["zero_config"]["stage3_param_persistence_threshold"] == 2**62  # one rank: all persistent
    naive = next(r for r in rows if r["name"] == "tiny naive")
    assert naive["hf_grad_ckpt"] is False and naive["attn_implementation"] == "sdpa"
    assert naive["sequence_len"] == 3 * 32
    # spec/baselines.md's protocol: one segment per sequence, HF checkpointing, the same tokens per step
    ref = next(r for r in rows if r["name"] == "tiny naive (baselines.md)")
    assert ref["hf_grad_ckpt"] is True and ref["sequence_len"] == 32
    assert "tok/s" in proc.stdout  # the table


def test_inference_benchmark_smoke(tmp_path):
    """benchmarks/inference.py --smoke: the GPU benchmark's code path (compress, generate from the summary vectors
    and after the full context in each mode, the report) on CPU with a tiny model; --help documents the flags."""
    out = tmp_path / "inference.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/inference.py", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["device"] == "cpu"
    (row,) = report["rows"]
    assert (row["context"], row["batch"], row["summary_vectors"]) == (64, 2, 8)  # 2 segments x 4 vectors
    for mode in ("dynamic", "static"):
        assert row[f"generate_speedup_{mode}"] > 0
    assert row["same_tokens_dynamic_vs_static"] == 4  # fp32: every mode gives the same tokens
    proc = subprocess.run(
        [sys.executable, "benchmarks/inference.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--decoding" in proc.stdout and "frozen" in proc.stdout and "--smoke" in proc.stdout


GQA_CONCAT_CHECK = """
import torch
from torch._inductor import config
from inductor_gqa_concat import register

gemms = []
config.post_grad_custom_post_pass = lambda g: gemms.extend(
    n for n in g.nodes if n.op == "call_function" and ("mm" in str(n.target) or "linear" in str(n.target))
)
config.freezing = True  # and CPU's own concatenation stays off (config.cpp.enable_concat_linear)
register()
q, k, v = (torch.nn.Linear(16, n, bias=False) for n in (16, 4, 4))
x = torch.randn(3, 16)
with torch.no_grad():
    got = torch.compile(lambda x: (q(x), k(x), v(x)))(x)
    want = (q(x), k(x), v(x))
assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
print(len(gemms))
"""


def test_gqa_concat_backport_makes_one_gemm_of_unequal_projections():
    """benchmarks/inductor_gqa_concat.py (used on torch < 2.12): frozen query/key/value projections of widths
    16/4/4 run as one matmul and give the three products. On CPU torch's own concatenation is off by default,
    so the registered rule alone does it (in a subprocess: the rule stays registered for the process)."""
    proc = subprocess.run(
        [sys.executable, "-c", GQA_CONCAT_CHECK],
        cwd=REPO / "benchmarks",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "1"
