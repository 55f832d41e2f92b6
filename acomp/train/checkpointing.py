"""`compression.segment_gradient_checkpointing: auto`: recompute segments in backward only where memory needs it.

Checkpointing recomputes every segment of a call but the last one in backward. On one GPU the weights and
optimizer states often set the peak, and keeping those segments' activations instead costs little there while
saving one segment forward per call (benchmarks/RESULTS.md); where ZeRO shards the states over GPUs, or the
segments are long, the activations set the peak. So `auto` runs its first two steps with checkpointing on,
measures the second (the first with the optimizer's states in memory, and none of the set-up's transient
peaks), and turns checkpointing off from the third step on when this estimate of the peak without it fits:

    estimate = the second step's peak  +  rate x (positions of the longest call - of the shortest last segment)
    rate     = bytes a call's forward leaves for its backward / positions of its last, unrecomputed segment
               (from the call whose last segment is longest: the least skewed by fixed costs)
    fits     = estimate <= FRACTION x (free device memory + what this process already holds)

Without checkpointing a call holds the activations of all its segments, rate x its positions however random
boundaries split them; with it, the measured peak held at least a last segment's. The rate also counts the
inputs the checkpoints keep, so the estimate errs towards keeping checkpointing. A call's positions are the same
at every step (its text tokens are a fixed share of the block), so the measured step's longest call bounds the
later ones. That holds where attention memory grows linearly with a segment's length (flash, cudnn and
memory-efficient kernels); where it grows with the square (eager attention, SDPA's math kernel, the variable
mode's 4D presence mask) `auto` keeps checkpointing on. Checkpointing goes off only if it fits on every rank.
Gradients are the same either way: the decision changes speed and memory, never the numbers. Each start of a
run (a resume too) decides again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from acomp.train.distributed import any_rank
from acomp.train.segments import sequence_positions

FRACTION = 0.85  # of the reachable device memory: the allocator's caching and fragmentation need the rest


@dataclass
class Decision:
    off: bool
    estimate_gib: float
    capacity_gib: float

    def line(self, step: int) -> str:
        """`step`: the measured optimizer step (1-based)."""
        how = f"off from step {step + 1}" if self.off else "kept on"
        return (
            f"segment checkpointing (auto): {how}; estimated peak without it {self.estimate_gib:.1f} GiB "
            f"of {self.capacity_gib:.1f} GiB reachable"
        )


@dataclass
class CheckpointingProbe:
    """Measures the forwards of one step (`start` before each call, `forward_done` between its forward and its
    backward) and then decides. The memory readings are methods, so tests can stand in for a GPU."""

    device: torch.device
    warm_up_steps: int = 1  # steps run as built before the measured one
    calls: list[tuple[int, list[int]]] = field(default_factory=list)  # (bytes held, positions per segment)
    _before: int = 0
    _positions: list[int] = field(default_factory=list)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def capacity(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def measures(self) -> bool:
        """Called once per step: whether this step is the measured one (the warm-up steps are not)."""
        if self.warm_up_steps > 0:
            self.warm_up_steps -= 1
            return False
        self.reset_peak()
        return True

    def start(self, positions: list[int]) -> None:
        """Before a call; `positions`: those of each of its segment forwards."""
        self._before, self._positions = self.allocated(), positions

    def forward_done(self) -> None:
        """After the call's forward, before its backward."""
        self.calls.append((self.allocated() - self._before, self._positions))

    def decide(self) -> Decision:
        held, positions = max(self.calls, key=lambda call: call[1][-1])
        rate = max(held, 0) / max(positions[-1], 1)
        recomputed = max(sum(p) for _, p in self.calls) - min(p[-1] for _, p in self.calls)
        estimate = self.peak() + rate * recomputed
        capacity = self.capacity()
        off = not any_rank(estimate > FRACTION * capacity, self.device)
        return Decision(off, estimate / 2**30, capacity / 2**30)


def positions_per_call(segment_lengths: list[list[int]], flops) -> list[list[int]]:
    """The positions of each segment forward of a sequence's calls (one per substep), as `FlopModel` (`flops`)
    counts them: [softprompt; text; summary tokens], no summary tokens for the sequence's last segment."""
    every = sequence_positions(
        segment_lengths, flops.summary_length, flops.accumulate, flops.summary_positions
    )
    calls, start = [], 0
    for lengths in segment_lengths:
        calls.append(every[start : start + len(lengths)])
        start += len(lengths)
    return calls


def configured(cfg) -> bool:
    """The model's setting for a run config's: `auto` starts on, and an exported model records it so."""
    return cfg.compression.segment_gradient_checkpointing is not False


def quadratic_attention(model_config, cfg) -> str | None:
    """What makes a segment's attention memory grow with the square of its length in training, if anything:
    there `auto` keeps checkpointing, as its estimate assumes linear growth."""
    from acomp.modeling.attention import folds_presence
    from acomp.train.engine import training_sdpa_backend

    implementation = model_config._attn_implementation
    if implementation == "eager":
        return "eager attention"
    if implementation == "sdpa" and training_sdpa_backend(cfg) == "math":
        return "SDPA's math kernel"
    if cfg.compression.compression_mode == "variable" and not folds_presence(model_config):
        return "the variable mode's 4D presence mask"
    return None


def checkpointing_plan(cfg, model_config, device: torch.device) -> tuple[CheckpointingProbe | None, str]:
    """The probe that decides `auto` after the run's second step, or none: the setting is not `auto`, there is
    no GPU memory to measure, or (with a line saying so) attention memory is quadratic there."""
    if cfg.compression.segment_gradient_checkpointing != "auto" or device.type != "cuda":
        return None, ""
    quadratic = quadratic_attention(model_config, cfg)
    if quadratic is not None:
        return None, (
            f"segment checkpointing (auto): kept on: under {quadratic} attention memory grows with the square "
            "of a segment's length"
        )
    return CheckpointingProbe(device), ""
