"""Two runs on one output directory, and Ctrl-C.

The second run is refused with one line naming the first (pid, host) before it builds anything, and the
first run's files stay its own. Ctrl-C (SIGINT) then stops the first run as SIGTERM does: a checkpoint after
the current step, exit 0. A killed run's lock is never stale (the kernel drops a flock with its holder):
test_fault_kill.py resumes after SIGKILL through the same lock.
"""

from __future__ import annotations

import signal
import socket

import pytest
from fault_helpers import (
    assert_checkpoints_complete,
    assert_no_traceback,
    error_lines,
    finish,
    latest,
    metric_steps,
    records,
    reference_config,
    start,
    tails,
    wait_until,
)
from runs import launch, write_config

from acomp.train.preemption import PreemptionHandler

pytestmark = pytest.mark.slow


def test_a_second_run_on_the_same_output_dir_is_refused_and_ctrl_c_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, checkpoint_every=0))
    first = start(config, ["train.max_steps=100000"], tmp_path / "logs")
    try:
        wait_until(lambda: metric_steps(out) >= 2, first, 240, "step 2")
        config_yaml = (out / "config.yaml").read_text()
        proc = launch(config, ["train.seed=1"], expect_rc=2, timeout=240)
        output = proc.stdout + proc.stderr
        assert_no_traceback(output)
        lines = error_lines(output)
        holder = f"pid {first[0].proc.pid} on {socket.gethostname()}"
        assert len(lines) == 1 and lines[0].startswith(
            f"error: train.output_dir={str(out)!r} is in use by another run ({holder}, since "
        ), output[-3000:]
        assert lines[0].endswith(
            f"lock {out / '.lock'}): wait for it to end, or give this run another train.output_dir"
        )
        assert (out / "config.yaml").read_text() == config_yaml  # the refused run wrote nothing

        first[0].proc.send_signal(signal.SIGINT)
        codes, _ = finish(first, 60)
    finally:
        for rank in first:
            if rank.proc.poll() is None:
                rank.proc.kill()
    assert codes == [130], tails(first)  # Ctrl-C: checkpoint, then the interrupted-command status
    text = first[0].output()
    assert_no_traceback(text)
    assert "stopped by SIGINT; checkpoint saved at" in text, text[-3000:]
    stopped = max(r["step"] for r in records(out))
    assert latest(out) == f"step_{stopped:08d}"  # checkpointed after the step it was in
    assert [r["step"] for r in records(out)] == list(range(1, stopped + 1))  # one run's steps, each once
    assert_checkpoints_complete(out)


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT asks for a checkpoint; a second one does not wait for it (KeyboardInterrupt; the
    launcher prints one line and exits 130)."""
    import os

    import torch

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job
    handler = PreemptionHandler(torch.device("cpu"))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.requested() and handler.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGINT) is before
