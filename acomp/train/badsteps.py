"""Steps with a non-finite loss: skipped, counted, and a stop after `train.max_bad_steps` in a row.

The skip itself is DeepSpeed's: with ZeRO (stages 1-3) its optimizer checks the gradient norm before the
update, all-reduces the "overflow" flag so every rank decides alike, and drops the step (no parameter or
optimizer-state change; the schedule does not advance) when the norm is inf/NaN. A NaN loss on any rank
makes every gradient NaN after the reduction, so that path is taken. This guard makes the decision visible
(metrics), checks that the skip really happened (otherwise the weights may now hold NaN: stop at once), and
stops a run that keeps producing bad steps instead of burning its allocation on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path


class NonFiniteLossError(RuntimeError):
    """The run stopped because of non-finite losses; the message names the steps and the last checkpoint."""


class BadStepGuard:
    def __init__(self, max_in_a_row: int, engine, last_checkpoint: Callable[[], Path | None]):
        self.max_in_a_row = max_in_a_row
        self.engine = engine
        self.last_checkpoint = last_checkpoint
        self.in_a_row = 0
        self.first_bad = self.last_bad = 0
        self._skipped = engine.skipped_steps  # DeepSpeed's own counter (checkpointed with the engine)

    def check(self, step: int, mean_loss: float) -> dict:
        """Account for optimizer step `step` whose loss, averaged over ranks, is `mean_loss` (the same value
        on every rank, so every rank takes the same branch). Returns the step's metrics fields."""
        skipped = self.engine.skipped_steps > self._skipped
        self._skipped = self.engine.skipped_steps
        finite = math.isfinite(mean_loss)
        if not finite and not skipped:
            raise NonFiniteLossError(
                f"the loss of step {step} is {mean_loss} but DeepSpeed applied the update (no ZeRO optimizer, "
                f"or bf16.check_grad_overflow is off), so the weights may now be corrupt; stopping. "
                f"{self._resume_hint()}"
            )
        if skipped:
            self.first_bad = self.first_bad if self.in_a_row else step
            self.in_a_row += 1
            self.last_bad = step
        else:
            self.in_a_row = 0
        return {"skipped": skipped, "skipped_steps": int(self.engine.skipped_steps)}

    def stop_if_exhausted(self) -> None:
        """Raise once `max_in_a_row` steps in a row were skipped (called after the step is logged)."""
        if self.in_a_row < self.max_in_a_row:
            return
        first, last = self.first_bad, self.last_bad
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        raise NonFiniteLossError(
            f"{self.in_a_row} bad steps in a row ({steps}: loss or gradients not finite, each skipped without "
            f"an update; train.max_bad_steps={self.max_in_a_row}); stopping. {self._resume_hint()}"
        )

    def _resume_hint(self) -> str:
        last = self.last_checkpoint()
        if last is None:
            return "There is no checkpoint yet."
        return f"The last good checkpoint is {last} (lower optim.lr or inspect the data before resuming)."
