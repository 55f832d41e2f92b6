"""benchmarks/wallclock.py: the pieces of a run within a wall-clock budget (the whole run:
tests/benchmarks/test_quality_smoke.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from acomp.config import config_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from wallclock import checkpoint_step, probe_costs, run_within, step_times  # noqa: E402


def test_step_times_take_the_last_record_of_each_step(tmp_path):
    records = [
        {"step": 1, "step_time_s": 3.0},
        {"step": 2, "step_time_s": 1.0},
        {"step": 2, "step_time_s": 0.5},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in records) + "\nnot json\n" + json.dumps({"event": "x"}) + "\n"
    )
    assert step_times(path) == [3.0, 0.5]  # a resumed run rewrote step 2


def test_checkpoint_step_and_argument_checks(tmp_path):
    assert checkpoint_step(tmp_path / "checkpoints" / "step_00000042") == 42
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        checkpoint_step(tmp_path / "final")
    cfg = config_from_dict({"model": {"arch": {"hidden_size": 32}}, "optim": {"warmup_steps": 2}})
    with pytest.raises(ValueError, match="warmup_steps=2 must be >= probe_steps=3"):
        run_within(cfg, 60, probe_steps=3)
    with pytest.raises(ValueError, match="exactly one of seconds and deadline"):
        run_within(cfg, 60, deadline=1.0, probe_steps=2)


def test_the_probe_plans_from_its_steady_steps_and_counts_compiling_as_set_up():
    # steps 1-3 compile and recompile (random segment lengths): they must not set the step time
    times = [30.0, 6.0, 5.0, 0.5, 0.6, 0.5, 0.5, 0.6, 0.5, 0.5]
    step_s, setup_s = probe_costs(times, probe_seconds=60.0)
    assert step_s == 0.5
    assert setup_s == pytest.approx(60.0 - 10 * 0.5)  # engine build + the compile excess
    assert probe_costs([4.0, 1.0], probe_seconds=3.0) == (1.0, 1.0)
    assert probe_costs([1.0, 1.0], probe_seconds=1.5)[1] == 0.0


def test_fixed_steps_skip_the_probe_and_report_the_runs_own_step_time(tmp_path, monkeypatch):
    import acomp.train

    calls = []

    def fake_run(cfg):  # the trainer: one metrics record per step, the first one compiling
        calls.append(cfg.train.max_steps)
        with open(tmp_path / "metrics.jsonl", "a") as f:
            for step in range(1, cfg.train.max_steps + 1):
                f.write(json.dumps({"step": step, "step_time_s": 5.0 if step == 1 else 0.25}) + "\n")

    monkeypatch.setattr(acomp.train, "run", fake_run)
    cfg = config_from_dict(
        {
            "model": {"arch": {"hidden_size": 32}},
            "optim": {"warmup_steps": 3},
            "train": {"output_dir": str(tmp_path)},
        }
    )
    done = run_within(cfg, 600, probe_steps=3, steps=7, log=lambda m: None)
    assert calls == [7]  # no probe: every run of a set trains the same steps, however fast it is
    assert (done.steps, done.planned_steps, done.step_seconds, done.stopped_at_deadline) == (
        7,
        7,
        0.25,
        False,
    )
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        run_within(cfg, 600, probe_steps=3, steps=0)


@pytest.mark.parametrize(
    "timer_fired, signal_name",
    [(True, "SIGUSR1"), (False, "SIGTERM"), (True, "SIGTERM"), (False, "SIGUSR1")],
    ids=["deadline", "sigterm", "sigterm-first-then-the-timer", "someone-elses-sigusr1"],
)
def test_only_the_deadline_timer_counts_as_a_finished_run(tmp_path, monkeypatch, timer_fired, signal_name):
    import wallclock

    import acomp.train

    timers = []

    class Timer:  # the budget's timer, fired by hand below
        def __init__(self, interval, function, args=()):
            self.fired = args[0]
            timers.append(self)

        def start(self):
            pass

        def cancel(self):
            pass

    calls = []

    def fake_run(cfg):  # the trainer: a long run stops after step 4 with its checkpoint saved
        calls.append(cfg.train.max_steps)
        if cfg.train.max_steps > 4:
            if timer_fired:
                timers[-1].fired.set()  # what the timer does before it signals the trainer
            # the trainer names the first signal it received
            raise acomp.train.Preempted(tmp_path / "checkpoints" / "step_00000004", signal_name)
        with open(tmp_path / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps({"step": s, "step_time_s": 0.25}) + "\n" for s in range(1, 5))

    monkeypatch.setattr(acomp.train, "run", fake_run)
    monkeypatch.setattr(wallclock.threading, "Timer", Timer)
    cfg = config_from_dict(
        {
            "model": {"arch": {"hidden_size": 32}},
            "optim": {"warmup_steps": 3},
            "train": {"output_dir": str(tmp_path)},
        }
    )
    if timer_fired and signal_name == "SIGUSR1":
        done = run_within(cfg, 600, probe_steps=3, steps=10, log=lambda m: None)
        assert calls == [10, 4]  # stopped at step 4, then that checkpoint exported
        assert (done.steps, done.planned_steps, done.stopped_at_deadline) == (4, 10, True)
    else:
        with pytest.raises(acomp.train.Preempted, match=signal_name):
            run_within(cfg, 600, probe_steps=3, steps=10, log=lambda m: None)
        assert calls == [10]  # not exported: a run stopped from outside is cut short, not finished
