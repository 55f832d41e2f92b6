"""Start training processes the way the launchers do, hurt them, and wait for them with hard deadlines.

Two ranks are two `python launchers/train.py` processes with RANK/WORLD_SIZE/MASTER_* set (as srun starts
them, so each can be signalled or killed on its own). Output goes to a log file per rank, never a pipe (a
full pipe would block the child). Every wait has a wall-clock limit; on expiry all processes are killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runs import REPO, free_port, rank_env, tiny_config, train_env

REFERENCE_STEPS = 10
CHECKPOINT_EVERY = 2
LAUNCHER = str(REPO / "launchers" / "train.py")
ERROR_LINE = re.compile(r"^(\[rank \d+\] )?(error|data error|config error): ")


def reference_config(corpus: Path, output_dir: Path, **train) -> dict:
    """Constant learning rate (the trajectory does not depend on max_steps), checkpoints every 2 steps."""
    return tiny_config(
        corpus,
        output_dir,
        optim={"schedule": "constant", "warmup_steps": 0},
        train={"max_steps": REFERENCE_STEPS, "checkpoint_every": CHECKPOINT_EVERY, **train},
    )


@dataclass
class Rank:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def start(
    config: Path, overrides: list[str], log_dir: Path, nproc: int = 1, env: dict | None = None
) -> list[Rank]:
    """Start `nproc` rank processes of the trainer; `env` adds variables (fault injection) to every rank."""
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {**train_env(), "PYTHONUNBUFFERED": "1", **(env or {})}
    port = free_port()
    ranks = []
    for rank in range(nproc):
        proc_env = {**base, **rank_env(rank, nproc, port)} if nproc > 1 else base
        log = log_dir / f"rank{rank}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, LAUNCHER, "--config", str(config), *overrides],
                cwd=REPO,
                env=proc_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ranks.append(Rank(proc, log))
    return ranks


def wait_until(predicate, ranks: list[Rank], timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll `predicate()` until true; fail (killing every rank) after `timeout` s or if a rank exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(r.proc.poll() is not None for r in ranks):
            kill_all(ranks)
            raise AssertionError(f"a rank exited while waiting for {what}:\n{tails(ranks)}")
        time.sleep(poll)
    kill_all(ranks)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{tails(ranks)}")


def finish(ranks: list[Rank], timeout: float) -> tuple[list[int], float]:
    """Exit statuses of every rank and the seconds until the last one exited; kills all after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_all(ranks)
            raise AssertionError(f"ranks still running after {timeout}s (a hang):\n{tails(ranks)}") from None
    return [r.proc.returncode for r in ranks], time.monotonic() - started


def kill_all(ranks: list[Rank]) -> None:
    for r in ranks:
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGCONT)  # a stopped process must be able to die
            r.proc.kill()
            r.proc.wait(timeout=30)


def tails(ranks: list[Rank], chars: int = 3000) -> str:
    return "\n".join(f"--- rank {i} (rc {r.proc.poll()})\n{r.output()[-chars:]}" for i, r in enumerate(ranks))


def metric_steps(output_dir: Path) -> int:
    """Number of complete records in metrics.jsonl (0 before the first step)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def latest(output_dir: Path) -> str | None:
    pointer = Path(output_dir) / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def assert_checkpoints_complete(output_dir: Path, ranks: int = 1) -> None:
    """Every `step_*` directory holds a whole checkpoint: DeepSpeed's files, each rank's trainer state, the
    config and corpus record (ZeRO-3 file names; the tests use ZeRO-3)."""
    import torch

    root = Path(output_dir) / "checkpoints"
    for path in sorted(root.glob("step_*")):
        names = {p.name for p in path.iterdir()}
        for r in range(ranks):
            want = {
                f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                f"trainer_state_rank{r}.pt",
            }
            assert want <= names, f"{path} is incomplete: {sorted(names)}"
            state = torch.load(path / f"trainer_state_rank{r}.pt", weights_only=False)
            assert state["step"] == int(path.name[5:]), path
        assert {"config.yaml", "corpus.json"} <= names, path


def error_lines(text: str) -> list[str]:
    """The launcher's one-line reports: "[rank R] " (several ranks) + "error: ...", "data error: ...", ..."""
    return [line for line in text.splitlines() if ERROR_LINE.match(line)]


def assert_no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text, text[-4000:]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
