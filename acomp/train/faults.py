"""Fault injection for the reliability tests (tests/faults/, docs/RELIABILITY.md): environment variables read
once per process. When none is set every hook is a no-op that costs one attribute lookup.

    ACOMP_FAULT_NAN_STEPS=3,5-7          the training loss becomes NaN at these optimizer steps (1-based)
    ACOMP_FAULT_NAN_RANK=1               ...on this rank only (default: every rank)
    ACOMP_FAULT_CHECKPOINT_SLEEP_S=30    every checkpoint write pauses this long after DeepSpeed's files and
                                         before the trainer state: a window to kill a half-written checkpoint
    ACOMP_FAULT_STEP_SLEEP_S=1           every optimizer step starts with a pause this long: a run that a test
                                         can watch and signal mid-way however fast its steps are

The NaN is injected by multiplying the model's loss, inside the forward, so the backward sees it exactly as
it would see a real overflow (every gradient becomes NaN). Never set these outside tests.
"""

from __future__ import annotations

import os
import time

NAN_STEPS = "ACOMP_FAULT_NAN_STEPS"
NAN_RANK = "ACOMP_FAULT_NAN_RANK"
CHECKPOINT_SLEEP = "ACOMP_FAULT_CHECKPOINT_SLEEP_S"
STEP_SLEEP = "ACOMP_FAULT_STEP_SLEEP_S"


def parse_steps(text: str) -> frozenset[int]:
    """`3,5-7` -> {3, 5, 6, 7}; the error names the variable and the bad item."""
    steps: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            first, _, last = item.partition("-")
            steps.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise ValueError(f"{NAN_STEPS}={text!r}: {item!r} is not a step or a range like 5-7") from None
    return frozenset(steps)


class _Faults:
    def __init__(self, env=os.environ):
        self.nan_steps = parse_steps(env.get(NAN_STEPS, ""))
        rank = env.get(NAN_RANK, "")
        self.nan_rank = int(rank) if rank.strip() else None
        self.checkpoint_sleep = float(env.get(CHECKPOINT_SLEEP, "0") or 0)
        self.step_sleep = float(env.get(STEP_SLEEP, "0") or 0)
        self.step = 0


_active = _Faults()


def install(module, rank: int) -> None:
    """Register the NaN hook on the model (the module inside the DeepSpeed engine) when asked for."""
    if not _active.nan_steps or (_active.nan_rank is not None and _active.nan_rank != rank):
        return

    def poison(mod, args, output):
        if mod.training and _active.step in _active.nan_steps and getattr(output, "loss", None) is not None:
            output.loss = output.loss * float("nan")
        return output

    module.register_forward_hook(poison)


def begin_step(step: int) -> None:
    """The loop is about to compute optimizer step `step` (1-based)."""
    _active.step = step
    if _active.step_sleep > 0:
        time.sleep(_active.step_sleep)


def checkpoint_pause() -> None:
    """Called in the middle of every checkpoint write."""
    if _active.checkpoint_sleep > 0:
        print(f"fault injection: pausing {_active.checkpoint_sleep:g}s inside a checkpoint write", flush=True)
        time.sleep(_active.checkpoint_sleep)
