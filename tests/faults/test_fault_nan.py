"""A non-finite loss (injected): the step is skipped (no update) and counted; after train.max_bad_steps in a
row the run stops with one clear error (exit 3) and its last good checkpoint intact. With 2 ranks a NaN on
one rank only makes both skip the same steps and stop together."""

from __future__ import annotations

import math

import pytest
from fault_helpers import (
    assert_checkpoints_complete,
    assert_no_traceback,
    error_lines,
    finish,
    latest,
    records,
    reference_config,
    start,
    tails,
)
from runs import write_config

from acomp.train import faults

pytestmark = pytest.mark.slow


def run_with_nan(corpus, tmp_path, nproc: int, steps: str, max_bad: int, rank: int | None = None):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, max_bad_steps=max_bad))
    env = {faults.NAN_STEPS: steps}
    if rank is not None:
        env[faults.NAN_RANK] = str(rank)
    overrides = ["train.micro_batch_size=1"] if nproc == 2 else []
    ranks = start(config, overrides, tmp_path / "logs", nproc=nproc, env=env)
    codes, _ = finish(ranks, 240)
    return out, ranks, codes


def check_metrics(out, bad: set[int], last: int) -> None:
    rows = records(out)
    assert [r["step"] for r in rows] == list(range(1, last + 1))
    for r in rows:
        assert r["skipped"] == (r["step"] in bad), r
        assert math.isfinite(r["loss"]) == (r["step"] not in bad), (
            r
        )  # good steps after a skip: weights intact
        assert r["skipped_steps"] == len([s for s in bad if s <= r["step"]]), r


def check_stop(ranks, codes, message: str) -> None:
    assert all(code == 3 for code in codes), tails(ranks)
    for r in ranks:
        lines = error_lines(r.output())
        assert len(lines) == 1 and message in lines[0], r.output()[-3000:]
        assert_no_traceback(r.output())


def test_nan_steps_are_skipped_then_the_run_stops(corpus, tmp_path):
    """NaN at step 2 (skipped, training goes on), then at 5, 6, 7 with max_bad_steps=3: stop after step 7.
    Checkpoints every 2 steps: the one due at 2 waits for step 3; 6 is never written (a bad step)."""
    out, ranks, codes = run_with_nan(corpus, tmp_path, 1, "2,5-7", max_bad=3)
    check_stop(ranks, codes, "3 bad steps in a row (steps 5-7")
    assert "last good checkpoint is" in error_lines(ranks[0].output())[0]
    check_metrics(out, bad={2, 5, 6, 7}, last=7)
    assert latest(out) == "step_00000004"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert_checkpoints_complete(out)


def test_nan_on_one_rank_makes_both_skip_and_stop(corpus, tmp_path):
    """NaN on rank 1 only, at steps 2 and 4-5, max_bad_steps=2: rank 0 never sees a NaN itself, yet both ranks
    skip steps 2, 4, 5 and both stop after step 5 with the same error."""
    out, ranks, codes = run_with_nan(corpus, tmp_path, 2, "2,4-5", max_bad=2, rank=1)
    check_stop(ranks, codes, "2 bad steps in a row (steps 4-5")
    check_metrics(out, bad={2, 4, 5}, last=5)
    assert latest(out) == "step_00000003"
    assert_checkpoints_complete(out, ranks=2)
