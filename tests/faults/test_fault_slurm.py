"""The README's `sbatch slurm/train_llama.sbatch` on a real one-node SLURM cluster (tests/support/slurm_cluster.py),
with the tiny config on CPU: the job trains; `scancel --signal=USR1 --batch` (what `--signal=B:USR1@600`
sends before the time limit) makes it checkpoint, exit 75 and requeue; the requeued job resumes from that
checkpoint and finishes with the losses of an uninterrupted run. Each step starts with a 1 s pause (fault
injection: the tiny steps take ~0.06 s, so a poll could miss the run's whole middle), and the trainer is held
(SIGSTOP) from step 3 until the signal is pending on it, so a slow signal path cannot let the job finish
unsignalled either.

Needs root and Debian's slurm-wlm (.ci/run installs it); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from fault_helpers import (
    REFERENCE_STEPS,
    assert_checkpoints_complete,
    metric_steps,
    records,
    reference_config,
)
from runs import REPO, free_port, losses, train_env, write_config
from slurm_cluster import ClusterUnavailable, start_cluster, unavailable

pytestmark = pytest.mark.slow

JOB_BOUND_S = 300  # each wait below: a job start, the trainer's set-up and a few tiny steps take ~30 s
ENDED = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"no SLURM cluster here: {reason}")
    try:
        started = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as e:
        pytest.skip(f"the SLURM daemons did not start here: {str(e).splitlines()[0]}")
    yield started
    started.stop()


def wait_for(predicate, what: str, cluster, job: str, job_log, ended=ENDED) -> None:
    """Poll until `predicate()`; fail with the job's and the daemons' logs after JOB_BOUND_S, or at once if
    the job reached one of the `ended` states first."""
    deadline = time.monotonic() + JOB_BOUND_S
    problem = f"timed out after {JOB_BOUND_S}s waiting for {what}"
    while time.monotonic() < deadline:
        if predicate():
            return
        state = cluster.job(job).get("JobState")
        if state in ended:
            problem = f"job {job} ended {state} while waiting for {what}"
            break
        time.sleep(0.5)
    text = job_log.read_text(errors="replace")[-4000:] if job_log.is_file() else "(no job log)"
    raise AssertionError(f"{problem}\n--- job log\n{text}\n{cluster.logs()}")


def trainer_pids(config: Path) -> list[int]:
    """The trainer processes srun started for `config` (not srun itself: its argv[0] is srun)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or it exited
            continue
        words = [a.decode(errors="replace") for a in argv]
        if words[0] == sys.executable and str(config) in words and any(w.endswith("train.py") for w in words):
            pids.append(int(proc.name))
    return pids


def usr1_pending(pid: int) -> bool:
    """Whether SIGUSR1 waits on the (stopped) process, per thread or process-wide (/proc/PID/status)."""
    bit = 1 << (signal.SIGUSR1 - 1)
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in lines if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & bit for mask in masks)


def test_sbatch_checkpoints_on_usr1_requeues_and_resumes_exactly(cluster, corpus, reference, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, checkpoint_every=0))
    env = {k: v for k, v in train_env().items() if not k.startswith("SLURM_")}
    env.update(
        cluster.env,
        CONFIG=str(config),
        PYTHON=sys.executable,
        LOG_DIR=str(tmp_path / "logs"),
        MASTER_PORT=str(free_port()),
        ACOMP_FAULT_STEP_SLEEP_S="1",
    )
    job_log = tmp_path / "job.out"
    submitted = cluster.command(
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={job_log}",
        str(REPO / "slurm" / "train_llama.sbatch"),
        env=env,
        cwd=REPO,
    )
    job = submitted.stdout.strip().split(";")[0]
    try:
        before_the_end = (*ENDED, "COMPLETED")  # a job that finished unsignalled outran the test
        wait_for(lambda: metric_steps(out) >= 3, "step 3", cluster, job, job_log, before_the_end)
        held = trainer_pids(config)
        assert held, "no trainer process found for the job"
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        try:
            cluster.command("scancel", "--signal=USR1", "--batch", job)
            pending = lambda: any(usr1_pending(pid) for pid in held)  # noqa: E731
            wait_for(pending, "USR1 to reach the held trainer", cluster, job, job_log, before_the_end)
        finally:
            for pid in held:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        requeued = lambda: cluster.job(job).get("Restarts") == "1"  # noqa: E731
        wait_for(requeued, "the requeue", cluster, job, job_log, before_the_end)
        done = lambda: cluster.job(job).get("JobState") == "COMPLETED"  # noqa: E731
        wait_for(done, "the requeued job", cluster, job, job_log)
    finally:
        if cluster.job(job).get("JobState") not in (None, "COMPLETED"):
            cluster.command("scancel", job, check=False)
    log = job_log.read_text()
    info = cluster.job(job)
    assert info["ExitCode"] == "0:0", (info, log[-3000:])
    stopped = re.search(r"stopped by SIGUSR1; checkpoint saved at \S+/step_(\d{8})", log)
    assert stopped and "got USR1" in log and "srun exited with 75" in log, log[-3000:]
    assert "requeueing job" in log and f"job {job} restart 1:" in log, log[-3000:]
    step = int(stopped.group(1))
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in log, log[-3000:]
    assert 0 < step < REFERENCE_STEPS
    assert [r["step"] for r in records(out)] == list(range(1, REFERENCE_STEPS + 1))  # each step once
    assert losses(out) == reference  # bitwise (fp32, CPU)
    assert_checkpoints_complete(out)
    print(f"job {job}: USR1 after step {step}, requeued, resumed, finished ({os.cpu_count()} CPUs)")
