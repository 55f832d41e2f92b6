"""Train within a wall-clock budget, with a learning-rate schedule that still decays to its end (the quality
benchmark's training stages: benchmarks/quality.py).

The schedule needs `train.max_steps` up front, but how many steps fit in N minutes depends on the machine.
So the run is sized from the trainer's own step time:

1. probe: `run(cfg)` for `probe_steps` steps (all inside the warmup, where the schedule does not depend on
   max_steps), checkpointed, not exported;
2. read the step time from metrics.jsonl (the median of the probe's second half: its first steps compile,
   and with random segment lengths recompile for new shapes) and the set-up cost (the rest of the probe's
   wall time, compilation included: the resume builds and compiles again);
3. resume with max_steps = what fits in the rest of the budget after one more set-up and the export.

Safety net: a timer sends this process SIGUSR1 at the deadline; the trainer then checkpoints after its
current step and stops (`Preempted`), and a last resume at that step only exports the weights. A stop the
timer did not ask for (SIGTERM, Ctrl-C) is raised as it is: the run is cut short, not finished.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from acomp.config import RunConfig


@dataclass
class WallclockRun:
    """What a run within a wall-clock budget did: its output directory, steps, measured step time and set-up cost."""

    output_dir: Path
    steps: int
    planned_steps: int
    step_seconds: float
    setup_seconds: float
    seconds: float
    stopped_at_deadline: bool


def run_within(
    cfg: RunConfig,
    seconds: float | None = None,
    *,
    deadline: float | None = None,
    probe_steps: int = 3,
    steps: int | None = None,
    log=print,
) -> WallclockRun:
    """Train `cfg` for about `seconds` of wall time (set-up and export included), or until `deadline`
    (a time.monotonic() value); returns what it did.

    `cfg.train.max_steps` is ignored (sized here); `cfg.optim.warmup_steps` must be >= `probe_steps`.
    `steps` fixes max_steps instead (no probe; the deadline still stops the run): runs that share a device
    then train on the same tokens whatever their speed.
    """
    if (seconds is None) == (deadline is None):
        raise ValueError("give exactly one of seconds and deadline")
    from acomp.train import Preempted, run

    if probe_steps < 2:
        raise ValueError(f"probe_steps must be >= 2 (the first step is not timed), got {probe_steps}")
    if cfg.optim.warmup_steps < probe_steps:
        raise ValueError(
            f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= probe_steps={probe_steps}: the probe's "
            "learning rates must not depend on max_steps, which is only known after it"
        )
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    started = time.monotonic()
    deadline = started + seconds if deadline is None else deadline
    out = Path(cfg.train.output_dir)
    if steps is None:
        step_s, setup_s = _probe(cfg, out, probe_steps, started, run)
        left = deadline - time.monotonic() - setup_s  # the resume costs about what the probe's set-up did
        planned = probe_steps + max(0, math.floor(left / step_s))
        log(
            f"budget: {step_s:.3f} s/step, set-up {setup_s:.1f} s, {left:.0f} s left -> max_steps={planned} "
            f"(probe {probe_steps})"
        )
    else:
        planned, setup_s = steps, 0.0
        log(f"budget: max_steps={planned} as given, {deadline - time.monotonic():.0f} s to the deadline")
    fired = threading.Event()
    timer = threading.Timer(max(0.0, deadline - time.monotonic() - setup_s / 2), _interrupt, (fired,))
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a late timer must not kill us outside run()
    stopped = False
    try:
        timer.start()
        try:
            run(_with_train(cfg, max_steps=planned))
            done = planned
        except Preempted as e:
            timer.cancel()
            if not (fired.is_set() and e.signal_name == signal.SIGUSR1.name):
                raise  # stopped from outside: its checkpoint is saved, but the budget's schedule did not end
            stopped = True
            done = checkpoint_step(e.checkpoint)
            log(f"budget: deadline reached at step {done} of {planned}; exporting that checkpoint")
            _release_memory()
            run(_with_train(cfg, max_steps=done))
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
        _release_memory()
    if steps is not None:  # no probe: the run's own steady step time, and the rest as set-up
        step_s, setup_s = probe_costs(step_times(out / "metrics.jsonl"), time.monotonic() - started)
    return WallclockRun(out, done, planned, step_s, setup_s, time.monotonic() - started, stopped)


def _probe(cfg: RunConfig, out: Path, probe_steps: int, started: float, run) -> tuple[float, float]:
    """Run the first `probe_steps` steps (checkpointed, not exported); their (seconds per step, set-up)."""
    run(_with_train(cfg, max_steps=probe_steps, export_final=False, checkpoint_every=0, eval_every=0))
    _release_memory()
    probed = time.monotonic() - started
    times = step_times(out / "metrics.jsonl")
    if len(times) < probe_steps:
        raise RuntimeError(
            f"{out / 'metrics.jsonl'} has {len(times)} step records after a {probe_steps}-step probe"
        )
    return probe_costs(times[:probe_steps], probed)


def probe_costs(times: list[float], probe_seconds: float) -> tuple[float, float]:
    """(seconds per step, set-up seconds) of a probe from its step times and wall time.

    The steady step time is the median of the second half of the steps, so compiling and recompiling early
    does not shrink the plan; whatever the probe spent beyond that many steady steps counts as set-up.
    """
    step_s = statistics.median(times[len(times) // 2 :])
    return step_s, max(0.0, probe_seconds - step_s * len(times))


def step_values(metrics_path: Path, key: str) -> dict[int, float]:
    """{step: value of `key`} over a metrics.jsonl's step records, in step order; the last record of a step wins
    (a resumed run logs the steps after its checkpoint again)."""
    by_step: dict[int, float] = {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in record and key in record:
            by_step[int(record["step"])] = float(record[key])
    return dict(sorted(by_step.items()))


def step_times(metrics_path: Path) -> list[float]:
    """step_time_s of every step record in a metrics.jsonl, in step order (the last record per step wins)."""
    return list(step_values(metrics_path, "step_time_s").values())


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory named step_<8 digits>."""
    from acomp.train.checkpoint import TAG_RE

    match = TAG_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (step_<8 digits>)")
    return int(match.group(1))


def _with_train(cfg: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def _interrupt(fired: threading.Event) -> None:
    fired.set()
    os.kill(os.getpid(), signal.SIGUSR1)


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit("benchmarks/wallclock.py is a module of benchmarks/quality.py, not a script: run that")
