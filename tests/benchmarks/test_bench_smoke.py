"""The benchmarks' CPU smoke runs: train_throughput.py builds and steps the shipped recipes through the
trainer's own set-up (ZeRO-1 and ZeRO-3 + LoRA, random and fixed boundaries) and writes every field the GPU
runs report; the GPU-only scripts import and document their flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import load_script

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    command = [
        sys.executable,
        "benchmarks/train_throughput.py",
        "--smoke",
        "--out",
        str(out),
        "--profile-steps",
        "1",
    ]
    proc = subprocess.run(
        [*command, "--corpus-dir", str(tmp_path / "corpora")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("date_utc", "command", "device", "torch", "transformers", "deepspeed", "world_size"):
        assert key in report["meta"], key
    rows = report["results"]
    assert [r["name"] for r in rows] == [
        "tiny random",
        "tiny fixed",
        "tiny-lora-z3 random",
        "tiny-lora-z3 fixed",
    ]
    for r in rows:
        assert r["status"] == "ok", (r["name"], r["status"])
        assert r["tokens_per_s"] > 0 and r["first_tokens_per_s"] > 0 and r["loss"] > 0
        assert r["tokens_per_step"] == 2 * 512  # global batch 2 x 512-token blocks
        assert len(r["step_times_s"]) == 3  # the profiled step comes after, untimed
        assert r["graphs_by_step"] == [0, 0, 0]  # no compiled layers on CPU
        table = Path(r["profile_file"]).read_text()  # the profiler's table, one file per row
        assert table.startswith("profiled steps: 1, wall ") and "Self CPU" in table
        assert "under cProfile, by tottime" in table and "train_step" in table  # whose Python the host runs
    assert rows[1]["profile_file"] == str(tmp_path / "smoke.tiny_fixed.profile.txt")
    settings = {r["name"]: r["settings"] for r in rows}
    assert settings["tiny random"]["compression"]["randomize_segments"] is True
    assert settings["tiny fixed"]["compression"]["segment_lengths"] == [128, 128]  # 2 x 2 segments of a block
    assert settings["tiny-lora-z3 random"]["lora"]["enabled"] is True  # the recipe's LoRA, as shipped
    assert rows[0]["random_over_fixed"] > 0 and rows[2]["random_over_fixed"] > 0
    assert "tok/s" in proc.stdout  # the table


def test_train_throughput_on_two_ranks_doubles_the_global_batch(tmp_path):
    """Under torchrun (2 CPU ranks, gloo) as on a multi-GPU host: rank 0 builds the corpus, every rank steps,
    the global batch is the row's times the rank count (weak scaling) and tokens/s counts both ranks."""
    from runs import free_port, train_env

    out = tmp_path / "smoke2.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    command += [
        "benchmarks/train_throughput.py",
        "--smoke",
        "--rows",
        "tiny-lora-z3:random",
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [*command, "--corpus-dir", str(tmp_path / "corpora")],
        cwd=REPO,
        env={**train_env(), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["world_size"] == 2
    (row,) = report["results"]
    assert row["status"] == "ok", row["status"]
    assert row["settings"]["train"]["global_batch_size"] == 4  # 2 per rank, as on one
    assert row["tokens_per_step"] == 4 * 512 and row["tokens_per_s"] > 0


# Runs train_throughput.py with its second row failing on rank 1 only, as an OOM on one GPU would.
FAIL_ON_RANK_1 = """
import sys
sys.path.insert(0, "benchmarks")
import train_throughput

calls, run_row = [], train_throughput.run_row


def failing_run_row(cfg, args, dist):
    calls.append(1)
    if len(calls) == 2 and dist.rank == 1:
        raise RuntimeError("CUDA out of memory (raised by the test on rank 1)")
    return run_row(cfg, args, dist)


train_throughput.run_row = failing_run_row
raise SystemExit(train_throughput.main())
"""


def test_train_throughput_row_failing_on_one_rank_ends_the_call(tmp_path):
    """Under torchrun a row that fails on one rank only must end the call (torchrun then stops the other rank,
    which waits in the row's collectives) instead of hanging until the process group's timeout; rank 0's
    report keeps the rows before it."""
    from runs import free_port, train_env

    script, out = tmp_path / "fail_on_rank_1.py", tmp_path / "fail.json"
    script.write_text(FAIL_ON_RANK_1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [f"--master_port={free_port()}", str(script), "--smoke", "--rows", "tiny:random"]
    command += ["tiny:fixed", "--out", str(out), "--corpus-dir", str(tmp_path / "corpora")]
    proc = subprocess.run(
        command,
        cwd=REPO,
        env={**train_env(), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=900,  # a hang lasts the process group's timeout (30 minutes)
    )
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "row 'tiny fixed' failed on rank 1 of 2 (OOM); ending the call" in proc.stderr
    first, *second = json.loads(out.read_text())["results"]
    assert first["name"] == "tiny random" and first["status"] == "ok"
    # rank 0 either waited until torchrun stopped it (NCCL) or saw its peer go (gloo) and ended the call too
    assert all(row["status"] != "ok" for row in second)


def smoke_report(script: str, tmp_path: Path) -> dict:
    """The JSON report of `benchmarks/<script> --smoke`, which must exit 0."""
    out = tmp_path / f"{Path(script).stem}.json"
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_inference_benchmark_smoke(tmp_path):
    """benchmarks/inference.py --smoke: the GPU benchmark's code path (compress, generate from the summary vectors
    and after the full context in each mode, the report) on CPU with a tiny model; --help documents the flags."""
    report = smoke_report("inference.py", tmp_path)
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


def test_decode_layouts_smoke(tmp_path):
    """benchmarks/decode_layouts.py --smoke: every summary layout decoded in each CPU mode; the padded and the
    compact variable layouts hold the same kept vectors, the compact one only those (padded to the longest)."""
    rows = {r["layout"]: r for r in smoke_report("decode_layouts.py", tmp_path)["rows"]}
    slots = [rows[name]["slots"] for name in ("fixed-50", "fixed-5", "variable-padded")]
    assert slots == [150, 15, 150]
    padded, compact = rows["variable-padded"], rows["variable-compact"]
    assert padded["kept_vectors_mean"] == compact["kept_vectors_mean"] <= compact["slots"] <= 3 * 6
    assert compact["bias"] and not rows["variable-equal"]["bias"] and rows["variable-equal"]["slots"] == 3 * 4
    assert compact["kv_bytes_per_sample"] < padded["kv_bytes_per_sample"]
    for row in rows.values():
        assert row["ms_per_token_dynamic"] > 0 and row["ms_per_token_static"] > 0


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


def test_train_throughput_variant_rows_name_their_recipe(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "train_throughput", None)  # undone after the test; load_script sets it
    bench = load_script("benchmarks/train_throughput.py")
    args = bench.parse_args(
        ["--rows", "llama-1b-z3:random", "llama-1b-z1:fixed", "--boundaries", "random",
         "--variant", "co:train.x=1", "--variant", "co@llama-1b-z1:train.x=1,train.y=2"]
    )  # fmt: skip
    rows = [(r["name"], r["extra"]) for r in bench.plan_rows(args)]
    assert rows == [
        ("llama-1b-z3 random", []),
        ("llama-1b-z1 fixed", []),
        ("llama-1b-z3 random [co]", ["train.x=1"]),  # no @: the first recipe
        ("llama-1b-z1 random [co]", ["train.x=1", "train.y=2"]),
    ]
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--variant", "co@llama-9b:train.x=1"])
    assert exit_info.value.code == 2 and "unknown recipe 'llama-9b'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (["train_throughput.py", "--smoke", "--set", "foo=1"], "row 'tiny random': unknown config key 'foo'"),
        (
            ["train_throughput.py", "--variant", "v:optim.lr=abc"],
            "row 'llama-1b-z1 random [v]': config key 'optim.lr' must be a number",
        ),
        (["train_throughput.py", "--steps", "0"], "--steps 0: expected >= 1"),
        (["inference.py", "--new-tokens", "0"], "argument --new-tokens: expected an integer >= 1, got 0"),
        (
            ["decode_layouts.py", "--batch-sizes", "8", "x"],
            "argument --batch-sizes: expected an integer >= 1, got 'x'",
        ),
        (
            ["preprocess_throughput.py", "--repeats", "0"],
            "argument --repeats: expected an integer >= 1, got 0",
        ),
        (
            ["streaming_throughput.py", "--workers", "2", "-1"],
            "argument --workers: expected an integer >= 0, got -1",
        ),
        (
            ["variable_study.py", "--smoke", "--lambdas", "-0.3"],
            "argument --lambdas: expected a number >= 0, got -0.3",
        ),
    ],
)
def test_benchmark_flags_are_refused_before_anything_is_built(command, error):
    """A bad count or config override exits 2 with one line naming it, before any corpus, model or GPU check
    (train_throughput's bad --set failed every row after its corpus and model were built and exited 0; a zero
    --repeats divided by zero after the whole run)."""
    script, *flags = command
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *flags],
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert error in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and not proc.stdout


def test_train_throughput_graphs_column_shows_the_last_step_that_compiled(monkeypatch):
    monkeypatch.setitem(sys.modules, "train_throughput", None)
    bench = load_script("benchmarks/train_throughput.py")
    assert bench.graphs_column([2, 0, 0, 1, 0]) == "3@4"  # a recompile in step 4
    assert bench.graphs_column([0, 0]) == "0" and bench.graphs_column(None) == "-"


def test_train_throughput_cold_compile_runs_each_row_in_its_own_process(tmp_path):
    """--cold-compile: every row runs in a child process (empty compile caches) and reports to one table."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    out = tmp_path / "cold.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--smoke", "--cold-compile", "--rows", "tiny",
         "--variant", "v:train.seed=1", "--out", str(out), "--corpus-dir", str(tmp_path / "corpora"),
         "--profile-steps", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == ["tiny random", "tiny fixed", "tiny random [v]", "tiny fixed [v]"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[2]["settings"]["train"]["seed"] == 1  # the variant's override reached its child
    assert "random_over_fixed" in rows[0]  # ratios computed across the children's rows
    # The children's result files are gone; their profiles are named after the parent's --out.
    profiles = [f"cold.tiny_{b}{v}.profile.txt" for b in ("fixed", "random") for v in ("", "_v_")]
    assert sorted(p.name for p in tmp_path.glob("cold*")) == ["cold.json", *profiles]
    assert proc.stdout.count("rnd/fix") == 1  # one table, the parent's


ENGINES_LEFT = """
import gc, sys
sys.path.insert(0, "tests/support")
from runs import load_script
bench = load_script("benchmarks/train_throughput.py")
bench.main(["--smoke", "--rows", "tiny-lora-z3:random", "tiny:random", "--out", sys.argv[1], "--corpus-dir", sys.argv[2]])
gc.collect()
from deepspeed.runtime.engine import DeepSpeedEngine
print("ENGINES", sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects()))
"""


def test_train_throughput_frees_each_rows_engine(tmp_path):
    """Rows run one after another in one process: a ZeRO-3 engine (held by DeepSpeed's process-wide module
    stack and release-plan cache) and a ZeRO-1 engine must both be gone afterwards, or their GPU memory counts
    into the next rows' peak."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "-c", ENGINES_LEFT, str(tmp_path / "out.json"), str(tmp_path / "corpora")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.split("ENGINES")[-1].strip() == "0"
