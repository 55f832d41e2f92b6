"""benchmarks/quality.py --smoke: every stage (corpus, budgeted pretraining and fine-tuning, the evaluation
protocol, the reports) at toy scale on CPU, as the GPU run does them at full scale; an ablation arm (a
variable-length one: the frontier's) shares the corpus and base and lands in the ablation table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
VARIABLE_ARM = (
    "var:compression.compression_mode=variable,compression.compression_max_len=4,"
    "compression.compression_lambda=0.1"
)


def test_quality_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "quality"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--out", str(out)]
    cmd += ["--arm", VARIABLE_ARM, "--set", "eval_stop_thresholds=[0.0, 1.0]"]  # variable runs only
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    data = json.loads((out / "results.json").read_text())
    rows = {row["name"]: row for row in data["headline"]["rows"]}
    assert list(rows) == ["no_context", "summary_1", "summary_2", "summary_3", "full_attention_192"]
    assert [rows[f"summary_{k}"]["summary_vectors"] for k in (1, 2, 3)] == [4.0, 8.0, 12.0]
    assert len({row["tokens"] for row in rows.values()}) == 1  # the same targets in every condition
    assert (
        rows["no_context"]["gap_closed_loss"] == 0.0 and rows["full_attention_192"]["gap_closed_loss"] == 1.0
    )
    base = [(row["condition"], row["context_tokens"]) for row in data["headline"]["base"]]
    assert base == [("base: no context", 0), ("base: full attention", 192)]
    ac = data["autocompressor"]
    # Every block's NLL per condition is kept (paired comparisons between runs); they sum to the rows.
    records = ac["records"]
    assert [r["index"] for r in records] == sorted(r["index"] for r in records)
    for name, row in rows.items():
        nll, tokens = sum(r["nll"][name] for r in records), sum(r["tokens"][name] for r in records)
        assert tokens == row["tokens"] and math.exp(nll / tokens) == pytest.approx(row["ppl"], rel=1e-9)
    assert "records" not in data["base"]
    assert set(ac["conditions"][0]["domains"]) == {
        "stdlib",
        "site-packages",
    }  # both sources, held out by document
    for stage in ("pretrain", "finetune"):
        info = json.loads((out / stage / "stage.json").read_text())
        assert info["steps"] >= 2 and (out / stage / "final" / "model.safetensors").is_file()
        assert info["median_tokens_per_s"] > 0  # the trainer's per-step tokens/s, over every step
    assert data["info"]["model_config"]["summary_length"] == 4
    assert (out / "ppl_vs_context.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 8 summary vectors | 128 |" in (out / "results.md").read_text()
    profile = data["summary_profile"]  # the 3 segments before the scored one, fixed length: no correlation
    assert (profile["segments"], profile["mean_vectors_per_segment"], profile["cache_summary_slots"]) == (
        3,
        4.0,
        12,
    )
    assert profile["length_loss_spearman"] is None and len(profile["pairs"]) == 3 * profile["blocks"]
    split = data["copy_split"]  # the headline's full attention and the summaries of its 3 segments
    assert (split["fa_context"], split["segments"], split["eval_segment"]) == (192, 3, 64)
    assert split["copy"]["targets"] + split["rest"]["targets"] == 63 * split["blocks"]
    if rows["no_context"]["tokens"] == 63 * split["blocks"]:  # the protocol scored the same blocks
        for name, key in (("no_context", "loss_no_context"), ("full_attention_192", "loss_full_attention")):
            mixed = sum(split[p]["targets"] * split[p][key] for p in ("copy", "rest")) / (
                63 * split["blocks"]
            )
            assert math.exp(mixed) == pytest.approx(rows[name]["ppl"], rel=1e-4)
    assert "Where the gap lies (" in (out / "results.md").read_text()

    # The arm: its own fine-tuning from the shared base (no second corpus or pretraining), its own report.
    assert sorted(p.name for p in (out / "arms" / "var").iterdir()) == [
        "finetune", "ppl_vs_context.png", "results.json", "results.md"
    ]  # fmt: skip
    arm = json.loads((out / "arms" / "var" / "results.json").read_text())
    assert arm["base"] is None  # the base rows are the headline run's
    arm_rows = {row["name"]: row for row in arm["headline"]["rows"]}
    assert {"summary_variable_1", "summary_variable_3"} <= set(arm_rows)
    assert 0 <= arm_rows["summary_variable_3"]["summary_vectors"] <= 12  # where the model stopped: 3 x 0..4
    # ...and where thresholds 0 and 1 stop it: after one vector, after all four
    assert [arm_rows[f"summary_variable_3_t{t}"]["summary_vectors"] for t in ("0.0", "1.0")] == [3.0, 12.0]
    assert (
        arm["settings"]["compression"]["compression_lambda"] == 0.1 and arm["settings"]["own_base"] is False
    )
    finetuned = json.loads((out / "arms" / "var" / "finetune" / "final" / "config.json").read_text())
    assert finetuned["compression_mode"] == "variable" and finetuned["compression_lambda"] == 0.1
    table = json.loads((out / "ablation.json").read_text())
    assert [(r["arm"], r["mode"]) for r in table] == [("default", "fixed"), ("var", "variable")]
    assert table[0]["ppl_all_segments"] == rows["summary_3"]["ppl"]
    assert table[1]["ppl_all_segments"] == arm_rows["summary_variable_3"]["ppl"]
    assert table[1]["kv_bytes_per_sample"] == arm["summary_profile"]["kv_bytes_per_sample"]
    assert table[0]["nll_hard"] is None and table[1]["nll_soft"] == arm["summary_profile"]["nll_soft"] > 0
    steps = json.loads((out / "arms" / "var" / "finetune" / "stage.json").read_text())["steps"]
    assert table[0]["length_settled_step"] is None and 1 <= table[1]["length_settled_step"] <= steps
    assert table[0]["threshold_points"] == []
    assert (table[0]["gap_copies"], table[0]["gap_rest"]) == (
        split["copy"]["gap_closed"],
        split["rest"]["gap_closed"],
    )
    assert [(p["stop_threshold"], p["vectors_per_segment"]) for p in table[1]["threshold_points"]] == [
        (0.0, 1.0), (1.0, 4.0)
    ]  # fmt: skip
    assert table[1]["threshold_points"][1]["ppl_all_segments"] == arm_rows["summary_variable_3_t1.0"]["ppl"]
    ablation = (out / "ablation.md").read_text()
    assert "| var | compression.compression_mode=variable" in ablation and "| var | 0.0 | 1.00 |" in ablation
    header, rule, *body = ablation.split("\n\n")[0].split("\n")
    assert header.count("gap closed: 3 segments") == 1  # the smoke protocol's 3 segments: one column, not two
    assert {line.count("|") for line in (header, rule, *body[:2])} == {header.count("|")}
    comparison = ablation.split("Against the fixed frontier")[1]  # the variable runs against k = 4 (default)
    assert "| var | " in comparison and "| var t0.0 | 1.00 |" in comparison and "| default |" in comparison
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_length_settled_step_is_where_the_length_last_entered_its_final_band(tmp_path):
    """The step from which the logged mean length stays within 10% (at least one vector) of its final value:
    after a late fall, the fall's end; a length that wanders out and back counts from its return."""
    from quality import length_settled_step

    def settled(lengths):
        path = tmp_path / "metrics.jsonl"
        rows = [{"step": i + 1, "loss": 1.0, "summary_length": x} for i, x in enumerate(lengths)]
        path.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "event": "start"}, *rows]))
        return length_settled_step(path)

    assert settled([50, 50, 50, 50]) == 1
    assert settled([50, 50, 47.3, 9.0, 9.4, 8.5]) == 4  # within one vector of 8.5 from step 4 on
    assert settled([50, 9, 30, 9.2, 9.0]) == 4  # wandered out at step 3
    assert settled([50, 50, 48.7]) == 1  # 10% of 48.7 is 4.9: never left the band
    assert length_settled_step(tmp_path / "missing.jsonl") is None
    # A run resumed from step 2 logs steps 3-4 again: the last record of a step wins.
    resumed = [(1, 50), (2, 50), (3, 50), (4, 9), (3, 9), (4, 9)]
    path = tmp_path / "resumed.jsonl"
    path.write_text("".join(json.dumps({"step": s, "summary_length": x}) + "\n" for s, x in resumed))
    assert length_settled_step(path) == 3


def test_frontier_points_average_replicates_and_leave_out_other_levers():
    from quality import frontier_points

    def row(arm, changes, mode, vectors, ppl, gap):
        return {
            "arm": arm, "changes": changes, "mode": mode, "vectors_per_segment": vectors,
            "ppl_all_segments": ppl, "gap_paper_segments": gap,
        }  # fmt: skip

    table = [
        row("default", {}, "fixed", 50.0, 10.0, 0.6),
        row("rep2", {"finetune_seed": "2"}, "fixed", 50.0, 12.0, 0.4),
        row("k5", {"summary_length": "5"}, "fixed", 5.0, 11.0, 0.3),
        row("lr", {"finetune_lr": "2e-3"}, "fixed", 50.0, 9.0, 0.7),  # another lever: not a frontier point
        row("var", {"compression.compression_lambda": "0.2"}, "variable", 4.04, 11.5, None),
    ]
    points = frontier_points(table)
    assert [(p["mode"], p["label"], p["vectors"]) for p in points] == [
        ("fixed", "k5", 5.0), ("fixed", "default, rep2", 50.0), ("variable", "var", 4.04)
    ]  # fmt: skip
    assert points[1]["ppl"] == pytest.approx(11.0) and points[1]["gap"] == pytest.approx(0.5)
    assert points[2]["gap"] is None
    # A variable run scored at other stop thresholds: one point each, in order of vectors.
    sweep = {
        "stop_threshold": 0.3,
        "vectors_per_segment": 1.5,
        "ppl_all_segments": 11.8,
        "gap_paper_segments": 0.2,
    }
    table[-1]["threshold_points"] = [sweep]
    variable = [
        (p["label"], p["vectors"], p["gap"]) for p in frontier_points(table) if p["mode"] == "variable"
    ]
    assert variable == [("var t0.3", 1.5, 0.2), ("var", 4.04, None)]


def test_variable_runs_are_set_against_the_fixed_frontier():
    from quality import against_fixed, replicate_spreads

    def row(arm, changes, mode, vectors, gap, points=()):
        return {
            "arm": arm, "changes": changes, "mode": mode, "vectors_per_segment": vectors, "ppl_all_segments": 10.0,
            "gap_paper_segments": gap, "threshold_points": list(points),
        }  # fmt: skip

    sweep = {
        "stop_threshold": 0.9,
        "vectors_per_segment": 40.0,
        "ppl_all_segments": 9.0,
        "gap_paper_segments": 0.5,
    }
    table = [
        row("default", {}, "fixed", 50.0, 0.40),
        row("k2", {"summary_length": "2"}, "fixed", 2.0, 0.20),
        row("k8", {"summary_length": "8"}, "fixed", 8.0, 0.30),
        row("k8-s2", {"summary_length": "8", "finetune_seed": "2"}, "fixed", 8.0, 0.32),
        row("lr", {"finetune_lr": "2e-3"}, "fixed", 4.0, 0.90),  # another lever: not on the frontier
        row("v1", {"compression.compression_lambda": "0.1"}, "variable", 4.0, 0.33, [sweep]),
        row("v2", {"compression.compression_lambda": "0.2"}, "variable", 2.04, 0.18),
        row("v3", {"compression.compression_lambda": "0.01"}, "variable", 50.0, None),  # no gap: left out
        row("v4", {"compression.compression_lambda": "0.3", "finetune_seed": "2"}, "variable", 1.0, 0.1),
        row("v5", {"compression.compression_lambda": "0.3", "finetune_seed": "3"}, "variable", 1.0, 0.12),
        row("k0", {"summary_length": "0"}, "fixed", 0.0, 0.0),  # no summaries: nothing to interpolate from
    ]
    got = {c["label"]: c for c in against_fixed(table)}
    assert list(got) == ["v1", "v2", "v4", "v5", "v1 t0.9"]  # replicates ("v4, v5" on the plot): a row each
    # 4 vectors: the fewest fixed at or above are k8 and its replicate (0.31); halfway in log between 2 and 8: 0.255.
    assert got["v1"]["above_label"] == "k8, k8-s2" and got["v1"]["above_gap"] == pytest.approx(0.31)
    assert got["v1"]["interpolated"] == pytest.approx(0.255)
    assert got["v2"]["above_label"] == "k2"  # 2.04 vectors count as 2.0
    assert got["v2"]["interpolated"] == pytest.approx(0.20)
    assert got["v4"]["above_label"] == "k2" and got["v4"]["interpolated"] is None  # below the fixed range
    assert got["v1 t0.9"]["above_label"] == "default" and got["v1 t0.9"]["above_gap"] == pytest.approx(0.40)
    assert got["v1 t0.9"]["interpolated"] == pytest.approx(0.31 + 0.09 * math.log(5) / math.log(50 / 8))
    no_fixed = [r for r in table if r["mode"] == "variable"]
    assert against_fixed(no_fixed) == []  # nothing to compare with
    # v4 and v5 differ only in their seed; v1 and v2 in lambda, "lr" is another lever (not a replicate of k=4).
    assert replicate_spreads(table) == ["k8, k8-s2: 2.0 points apart", "v4, v5: 2.0 points apart"]


def test_an_evaluation_at_other_stop_thresholds_is_not_done_already(tmp_path):
    from quality import QualitySettings, evaluated_already

    def variable(**changes):
        return QualitySettings(out=str(tmp_path), compression={"compression_mode": "variable"}, **changes)

    run = variable(eval_stop_thresholds=(0.5,))
    (run.stage_dir("finetune")).mkdir(parents=True)
    (run.stage_dir("finetune") / "stage.json").write_text("{}")
    assert not evaluated_already(run)
    results = run.arm_root / "results.json"
    results.write_text(json.dumps({"settings": {"eval_stop_thresholds": [0.5]}}))
    os.utime(results, (time.time() + 5, time.time() + 5))  # newer than the fine-tuning
    assert evaluated_already(run)
    assert not evaluated_already(variable(eval_stop_thresholds=(0.5, 0.7)))
    results.write_text(json.dumps({"settings": {}}))  # written before the sweep existed
    os.utime(results, (time.time() + 5, time.time() + 5))
    assert evaluated_already(variable())
    # Another inference stop rule is another evaluation of the same trained run.
    assert not evaluated_already(variable(eval_stop_rule="cumulative"))
    # ... but not of a fixed-length run, which has no stop to decide.
    assert evaluated_already(QualitySettings(out=str(tmp_path), eval_stop_rule="cumulative"))
    assert evaluated_already(QualitySettings(out=str(tmp_path), eval_stop_thresholds=(0.5,)))
    results.write_text(json.dumps({"settings": {"eval_stop_rule": "cumulative"}}))
    os.utime(results, (time.time() + 5, time.time() + 5))
    assert evaluated_already(variable(eval_stop_rule="cumulative"))


def test_settings_changes_and_arms_are_checked():
    from quality import QualitySettings

    default = QualitySettings()
    arm = default.changed({"summary_init": "normal", "arch.hidden_size": "512", "finetune_lr": "1"}, arm="a")
    assert (arm.summary_init, arm.arch["hidden_size"], arm.finetune_lr) == ("normal", 512, 1.0)
    assert default.arch["hidden_size"] == 768  # a copy
    assert arm.own_base  # the width changes the base: the arm pretrains its own
    assert arm.stage_dir("pretrain") == default.root / "arms" / "a" / "pretrain"
    same_base = default.changed({"finetune_minutes": "2", "finetune_steps": "40"}, arm="b")
    assert not same_base.own_base and same_base.stage_dir("pretrain") == default.stage_dir("pretrain")
    assert (same_base.finetune_steps, default.finetune_steps) == (40, None)
    assert default.changed({"pretrain_steps": "500"}, arm="c").own_base  # a longer base is another base
    assert default.changed({"eval_stop_thresholds": "[0, 0.5]"}).eval_stop_thresholds == (0.0, 0.5)
    assert default.changed({"eval_stop_rule": "cumulative"}).eval_stop_rule == "cumulative"
    assert default.changed({"eval_stop_rule": "null"}).eval_stop_rule is None
    with pytest.raises(ValueError, match="eval_stop_rule must be one of .* got 'median'"):
        default.changed({"eval_stop_rule": "median"})
    for bad, message in (
        ("0.5", "'eval_stop_thresholds' must be a list, got float: 0.5"),
        ("null", "'eval_stop_thresholds' must be a list, got NoneType: None"),
        ("[a]", "'eval_stop_thresholds\\[0\\]' must be a number, got str: 'a'"),
        ("[true]", "'eval_stop_thresholds\\[0\\]' must be a number, got bool: True"),
        ("[1.5]", "eval_stop_thresholds must be in \\[0, 1\\], got 1.5"),
    ):
        with pytest.raises(ValueError, match=message):
            default.changed({"eval_stop_thresholds": bad})
    # Replicates: another seed for the fine-tuning shares the base; another base seed pretrains its own.
    from quality import finetune_config, pretrain_config

    replicate = default.changed({"finetune_seed": "7"}, arm="r")
    assert not replicate.own_base and finetune_config(replicate).train.seed == 7
    assert finetune_config(default).train.seed == 1 and pretrain_config(default).train.seed == 0
    other_base = default.changed({"pretrain_seed": "3"}, arm="s")
    assert other_base.own_base and pretrain_config(other_base).train.seed == 3
    assert same_base.stage_dir("corpus") == default.stage_dir("corpus")
    with pytest.raises(ValueError, match="unknown setting 'finetune_rate'"):
        default.changed({"finetune_rate": "1e-3"})
    with pytest.raises(ValueError, match="setting substeps=.two.: config key .substeps. must be an integer"):
        default.changed({"substeps": "two"})
    with pytest.raises(ValueError, match="arm 'c' changes vocab: every arm keeps the corpus"):
        default.changed({"vocab": "8000"}, arm="c")
    with pytest.raises(ValueError, match="finetune_from must be base or scratch"):
        default.changed({"finetune_from": "lm"})
    # A value the trainer refuses is refused here, before anything runs (one --set item per KEY=VALUE).
    with pytest.raises(ValueError, match="arm 'v': config key 'compression.compression_mode' must be one of"):
        default.changed(
            {"compression.compression_mode": "variable,compression.compression_lambda=0.2"}, arm="v"
        )
    with pytest.raises(ValueError, match="settings: .*finetune_micro|settings: .*micro_batch_size"):
        default.changed({"finetune_micro": "0"})
    with pytest.raises(
        ValueError, match="arm 'w': compression.compression_max_len=50 .* does not fit the model"
    ):
        QualitySettings.tiny().changed(
            {"compression.compression_mode": "variable", "compression.compression_max_len": "50"}, arm="w"
        )


def test_budgets_and_eval_shapes_are_refused_before_any_stage(tmp_path, capsys):
    # Each of these would otherwise fail only in the eval stage, after both trainings (or not at all).
    from quality import QualitySettings, main

    tiny = QualitySettings.tiny()  # 512-token blocks, 64-token segments, E = 64
    for changes, message in (
        ({"eval_segment": "-5"}, "settings: eval_segment must be a positive integer, got -5"),
        ({"eval_blocks": "0"}, "settings: eval_blocks must be >= 1, got 0"),
        ({"eval_minutes": "0"}, "settings: eval_minutes must be > 0, got 0.0"),
        ({"max_context_segments": "0"}, "settings: max_context_segments must be >= 1"),
        ({"max_context_segments": "9"}, "= 640 tokens, but block_size is 512"),
        ({"window": "64"}, "window=64 leaves full attention no context before eval_segment=64"),
        (
            {"segment_length": "165", "eval_segment": "16"},
            "the summary profile reads 3 x segment_length=165 \\+ a 32-token prompt per block",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            tiny.changed(changes)
    with pytest.raises(ValueError, match="arm 'x': eval_segment must be >= 2"):
        tiny.changed({"eval_segment": "1"}, arm="x")
    # fewer context segments than the paper's 3: the profile and the copy split read what the eval has
    from quality import copy_split_config, profile_config

    two = tiny.changed({"max_context_segments": "2"})
    assert profile_config(two).segments == copy_split_config(two).segments == 2
    # the command line's budgets too, with exit 2 and nothing written
    for argv in (["--eval-minutes", "-1"], ["--minutes", "0", "--stage", "finetune"], ["--eval-blocks", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["--smoke", "--out", str(tmp_path / "q"), *argv])
        assert e.value.code == 2
    assert "eval_blocks must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_parallel_at_most_n_processes_at_a_time(tmp_path, monkeypatch):
    """--parallel N starts the next run's process as one ends, never more than N at once, and each child gets
    the command less `--parallel N` plus its own `--stage` and `--only`."""
    import subprocess as sp
    from types import SimpleNamespace

    from quality import run_parallel, without_parallel

    assert without_parallel(["--smoke", "--parallel", "2", "--arm", "a:x=1"]) == ["--smoke", "--arm", "a:x=1"]
    assert without_parallel(["--parallel", "--arm", "a:x=1", "--parallel=3"]) == ["--arm", "a:x=1"]
    started, live, most = [], set(), [0]

    class Child:
        def __init__(self, command, **kwargs):
            self.name, self.polls, self.returncode = command[-1], 0, None
            started.append(command)
            live.add(self.name)
            most[0] = max(most[0], len(live))

        def poll(self):
            self.polls += 1
            if self.polls >= 3:
                self.returncode = 0
                live.discard(self.name)
            return self.returncode

    monkeypatch.setattr(sp, "Popen", Child)
    monkeypatch.setattr("time.sleep", lambda s: None)
    runs = [SimpleNamespace(name=n, arm_root=tmp_path / n) for n in ("headline", "a", "b", "c", "d")]
    run_parallel(runs, "finetune", ["--smoke", "--parallel", "2"], at_most=2)
    assert most[0] == 2 and [c[-1] for c in started] == ["headline", "a", "b", "c", "d"]
    assert all(c[2:] == ["--smoke", "--stage", "finetune", "--only", c[-1]] for c in started)
    started.clear()
    live.clear()
    most[0] = 0
    run_parallel(runs, "eval", ["--parallel"])  # no N: all at once
    assert most[0] == 5


def test_parallel_arms_train_and_evaluate_side_by_side(tmp_path):
    """--parallel: one process per run for each stage (the corpus built once, before them; the bases of the
    headline and of the arm that changes a pretraining setting side by side, the arm that changes none on the
    headline's); each run's log is kept, and the ablation table covers every run. With pretrain_steps and
    finetune_steps every run trains those steps, however the processes share the CPU. `--parallel 2` runs
    the three fine-tunings and evaluations two at a time."""
    out = tmp_path / "quality"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "quality.py"),
        "--smoke",
        "--out",
        str(out),
        "--parallel",
        "2",
    ]
    cmd += ["--arm", "k2:summary_length=2", "--arm", "b2:pretrain_seed=2", "--set", "pretrain_steps=3"]
    cmd += ["--set", "finetune_steps=4", "--pretrain-minutes", "4", "--finetune-minutes", "4"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "pretrain: 2 runs at once" in proc.stdout
    assert "finetune: 3 runs 2 at a time" in proc.stdout and "eval: 3 runs 2 at a time" in proc.stdout
    for root in (out, out / "arms" / "b2"):
        assert json.loads((root / "pretrain" / "stage.json").read_text())["steps"] == 3
        assert "exported HF weights" in (root / "pretrain.log").read_text()
    for root in (out, out / "arms" / "k2", out / "arms" / "b2"):
        assert "exported HF weights" in (root / "finetune.log").read_text()
        assert (root / "results.json").is_file() and (root / "eval.log").is_file()
        # The side-by-side evals leave the decode untimed; the parent then times each alone.
        assert "not timed (a shared device)" in (root / "eval.log").read_text()
        assert "ms/token" in (root / "results.md").read_text()
    assert not (out / "arms" / "k2" / "pretrain").exists()  # the headline's base, shared
    table = json.loads((out / "ablation.json").read_text())
    assert [(r["arm"], r["vectors_per_segment"], r["finetune_steps"]) for r in table] == [
        ("default", 4.0, 4),
        ("k2", 2.0, 4),
        ("b2", 4.0, 4),
    ]
    assert all(r["decode_ms_per_token"] > 0 for r in table)
    # The two fixed lengths on one base (not b2, another base) give the room-for-learned-lengths table.
    ablation = (out / "ablation.md").read_text()
    assert "Room for learned lengths" in ablation and "| 2 / 4 |" in ablation
