"""One rank dies (SIGKILL) or hangs (SIGSTOP): the other exits non-zero within a bounded time with one clear
error line, instead of waiting in a collective forever; the last checkpoint stays complete and the run
resumes from it."""

from __future__ import annotations

import signal

import pytest
from fault_helpers import (
    REFERENCE_STEPS,
    assert_checkpoints_complete,
    assert_no_traceback,
    error_lines,
    finish,
    kill_all,
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

# gloo reports a dead peer at once ("Connection reset by peer"); a hung one after train.dist_timeout_s.
DEAD_PEER_BOUND_S = 60
HANG_TIMEOUT_S = 15


def two_ranks(corpus, tmp_path, timeout_s: int):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, micro_batch_size=1))
    overrides = ["train.max_steps=100000", f"train.dist_timeout_s={timeout_s}"]
    ranks = start(config, overrides, tmp_path / "logs", nproc=2)
    wait_until(lambda: latest(out) is not None and metric_steps(out) >= 3, ranks, 240, "a checkpoint")
    return out, ranks, config


def check_survivor(ranks, out, bound_s: float, expect: tuple[str, ...]) -> None:
    codes, seconds = finish(ranks[:1], bound_s)
    assert codes[0] not in (0, None), tails(ranks)
    text = ranks[0].output()
    lines = error_lines(text)
    found = len(lines) == 1 and any(word in lines[0] for word in expect)
    assert found and "lost contact with the other ranks" in lines[0], text[-3000:]
    assert_no_traceback(text)
    assert "deepspeed_shm_comm" not in text  # no op build before the rendezvous (acomp.train.distributed)
    assert_checkpoints_complete(out, ranks=2)
    print(f"survivor exited {codes[0]} after {seconds:.1f}s: {lines[0][:200]}")


def test_a_dead_rank_makes_the_other_exit_with_a_clear_error(corpus, reference, tmp_path):
    out, ranks, config = two_ranks(corpus, tmp_path, timeout_s=600)  # a dead peer must not need the timeout
    ranks[1].proc.kill()
    check_survivor(ranks, out, DEAD_PEER_BOUND_S, ("Connection",))
    assert int(latest(out)[5:]) < REFERENCE_STEPS

    launch(config, nproc=2)  # both ranks again, as a requeued job: resumes from the newest checkpoint
    assert [r["step"] for r in records(out)] == list(range(1, REFERENCE_STEPS + 1))
    resumed = losses(out)
    for step in range(
        1, REFERENCE_STEPS + 1
    ):  # 2-rank ZeRO-3 vs the 1-rank reference, see test_fault_signals
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), (step, resumed, reference)


def test_a_hung_rank_makes_the_other_exit_after_the_timeout(corpus, tmp_path):
    out, ranks, _ = two_ranks(corpus, tmp_path, timeout_s=HANG_TIMEOUT_S)
    ranks[1].proc.send_signal(signal.SIGSTOP)
    try:
        # gloo words a timed-out collective by its kind: "Timed out ..." or "Application timeout ..."
        check_survivor(ranks, out, HANG_TIMEOUT_S + DEAD_PEER_BOUND_S, ("Timed out", "Application timeout"))
    finally:
        kill_all(ranks)
