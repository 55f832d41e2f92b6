"""Progress of a long job: a tqdm bar on a terminal, plain lines otherwise.

tqdm redraws its bar with carriage returns; a log file (SLURM output, CI) keeps every redraw on one growing
line. So a bar is drawn only on a terminal (or in a notebook), and elsewhere the same progress is printed as
ordinary lines: one every `every` units, or (without `every`) one every `interval_s` seconds, and one at the
end. The trainer, the evaluation protocol and the corpus build all report through :class:`Progress`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def draws_bars(stream: TextIO) -> bool:
    """Whether a bar can be redrawn on `stream`: a terminal, or a Jupyter kernel (tqdm.auto's widget)."""
    if "ipykernel" in sys.modules and stream in (sys.stderr, sys.stdout):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts units of work (`update`) and shows them: a tqdm bar when `stream` (default stderr) is a
    terminal, else a line `desc: n/total unit (p%) in s, rate unit/s`. `every=0` prints no progress lines
    (for a caller that prints its own, such as the trainer's per-step records); `enabled=False` shows
    nothing. `write` prints a line of the caller's without breaking the bar."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        *,
        initial: int = 0,
        enabled: bool = True,
        every: int | None = None,
        interval_s: float = 30.0,
        stream: TextIO | None = None,
    ):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit = total, desc, unit
        self.initial = self.count = self.shown = initial
        self.enabled = enabled
        self.every, self.interval_s = every, interval_s
        self.started = self.last_line = time.monotonic()
        self.postfix: dict[str, object] = {}
        self.bar = None
        if enabled and draws_bars(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream
            )

    @property
    def lines(self) -> bool:
        """Whether progress is printed as plain lines (enabled, not a terminal, and lines wanted)."""
        return self.enabled and self.bar is None and self.every != 0

    def update(self, n: int = 1, **postfix) -> None:
        """Add `n` units; `postfix` (e.g. loss=...) is shown beside the count."""
        self.count += n
        if postfix:
            self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        if not self.lines:
            return
        now = time.monotonic()
        if self.every:
            due = self.count // self.every > self.shown // self.every
        else:
            due = now - self.last_line >= self.interval_s
        if due:
            self._line(now)

    def write(self, line: str) -> None:
        """Print `line` on stdout, above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Close the bar, or print the final count when it has not been printed yet."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines and self.count != self.shown:
            self._line(time.monotonic())
        self.enabled = False

    def _line(self, now: float) -> None:
        total = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        elapsed = now - self.started
        rate = f", {(self.count - self.initial) / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(
            f"{self.desc}: {self.count}{total} {self.unit}{share} in {elapsed:.0f} s{rate}{extra}",
            file=self.stream,
            flush=True,
        )
        self.shown, self.last_line = self.count, now
