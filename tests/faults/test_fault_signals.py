"""SIGTERM / SIGUSR1 (SLURM preemption): the run checkpoints after the current step and exits 0 within a
bounded time; resuming reproduces the uninterrupted run's per-step losses."""

from __future__ import annotations

import signal
import time

import pytest
from fault_helpers import (
    REFERENCE_STEPS,
    assert_checkpoints_complete,
    finish,
    latest,
    metric_steps,
    records,
    reference_config,
    start,
    tails,
    wait_until,
)
from runs import launch, losses, write_config

pytestmark = pytest.mark.slow

# Signal -> exit: the rest of the current step (~0.2 s here) + a checkpoint (~1 s); generous for loaded CI.
EXIT_BOUND_S = 60
# 2 ranks (ZeRO-3, one sequence each) vs the 1-rank reference (two sequences): only the order of fp32
# reductions differs (tests/train/test_train_distributed.py measures ~4e-8).
TWO_RANK_RTOL = 1e-5


def preempt(tmp_path, config, out, sig, nproc: int, at_step: int, to_rank: int) -> float:
    """Start an endless run, send `sig` to one rank after `at_step` steps; returns seconds until all exited."""
    overrides = ["train.max_steps=100000"] + (["train.micro_batch_size=1"] if nproc == 2 else [])
    ranks = start(config, overrides, tmp_path / f"logs-{sig.name}", nproc=nproc)
    wait_until(lambda: metric_steps(out) >= at_step, ranks, 240, f"step {at_step}")
    ranks[to_rank].proc.send_signal(sig)
    codes, seconds = finish(ranks, EXIT_BOUND_S)
    assert codes == [0] * nproc, tails(ranks)
    for r in ranks:
        assert "stopped by" in r.output() and "checkpoint saved at" in r.output(), tails(ranks)
    stopped = max(r["step"] for r in records(out))
    assert latest(out) == f"step_{stopped:08d}"  # checkpointed after the step it was in
    assert stopped < REFERENCE_STEPS, "the run outran the signal; the test needs slower steps"
    assert_checkpoints_complete(out, ranks=nproc)
    print(
        f"{sig.name} to rank {to_rank} of {nproc}: all exited 0 after {seconds:.1f}s, checkpoint at step {stopped}"
    )
    return seconds


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(corpus, reference, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, checkpoint_every=0))
    started = time.monotonic()
    seconds = preempt(tmp_path, config, out, signal.SIGTERM, nproc=1, at_step=3, to_rank=0)
    assert seconds < EXIT_BOUND_S, f"took {seconds:.1f}s ({time.monotonic() - started:.0f}s in all)"

    launch(config)
    assert [r["step"] for r in records(out)] == list(range(1, REFERENCE_STEPS + 1))  # each step once
    assert losses(out) == reference  # bitwise (fp32, CPU)


def test_sigusr1_to_one_of_two_ranks_stops_both_and_resumes(corpus, reference, tmp_path):
    """SLURM signals every task, but one rank seeing it is enough: both checkpoint after the same step and
    exit 0; the resumed 2-rank run continues the trajectory."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, checkpoint_every=0))
    preempt(tmp_path, config, out, signal.SIGUSR1, nproc=2, at_step=2, to_rank=1)

    launch(config, ["train.micro_batch_size=1"], nproc=2)
    assert [r["step"] for r in records(out)] == list(range(1, REFERENCE_STEPS + 1))
    resumed = losses(out)
    for step in range(1, REFERENCE_STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=TWO_RANK_RTOL), (step, resumed, reference)
