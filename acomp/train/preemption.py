"""SIGTERM / SIGUSR1 / SIGINT -> checkpoint at the end of the current step, then exit (status 0, or
`train.preempt_exit_code`: the SLURM templates ask for EXIT_REQUEUE and requeue the job on it; SIGINT, a user's
Ctrl-C, always 130).

SLURM sends SIGUSR1 a configurable time before the limit (the sbatch templates ask for it) and SIGTERM on
preemption or scancel; Ctrl-C sends SIGINT, and a second Ctrl-C stops at once without a checkpoint
(KeyboardInterrupt). The handler only records the signal; the loop asks `requested()` once per step,
which agrees across ranks (a signal seen by any rank stops them all after the same step). The handler is
installed when the training loop starts; a signal during set-up ends the process as usual (nothing to save).
"""

from __future__ import annotations

import signal

import torch

from acomp.train.distributed import any_rank

# The exit status slurm/common.sh asks for (train.preempt_exit_code=75) after a signal made the run checkpoint
# and stop: "temporary failure, run me again" (EX_TEMPFAIL); it requeues the job on it.
EXIT_REQUEUE = 75


class PreemptionHandler:
    def __init__(self, device: torch.device, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.device = device
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C again: do not wait for the checkpoint

    def requested(self) -> bool:
        """True on every rank once any rank has received a signal (one tiny collective per call)."""
        return any_rank(self.received is not None, self.device)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
