"""Cut a batch of blocks into BPTT substeps and each substep into segments (paper section 3).

A block of L tokens becomes `training_substeps` contiguous, (nearly) equal slices. Each slice is one
truncated-BPTT window: its `segments_per_substep` segments are compressed in one model call, so gradients
flow through their summary vectors; the softprompt handed to the next slice is detached.

Segment boundaries are either fixed (`segment_lengths`; the block is cut to its last
sum(segment_lengths) * substeps tokens) or drawn at random per substep as in the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from acomp.config import CompressionConfig


@dataclass
class Substep:
    """One BPTT window: input ids [B, sum(segment_lengths)] and how to cut them into segments."""

    input_ids: torch.Tensor
    segment_lengths: list[int]


def split_substeps(
    input_ids: torch.Tensor,
    cfg: CompressionConfig,
    max_segment_length: int,
    generator: torch.Generator | None = None,
) -> list[Substep]:
    """A batch of blocks [B, L] -> the substeps of one training step, in order."""
    if cfg.randomize_segments:
        per = cfg.segments_per_substep
        return [
            Substep(
                s,
                random_segment_lengths(s.shape[1], per, max_segment_length, generator, cfg.segment_multiple),
            )
            for s in _equal_slices(input_ids, cfg.training_substeps)
        ]
    lengths = list(cfg.segment_lengths)
    need = sum(lengths) * cfg.training_substeps
    if input_ids.shape[1] < need:
        raise ValueError(
            f"blocks have {input_ids.shape[1]} tokens but compression.segment_lengths={lengths} x "
            f"training_substeps={cfg.training_substeps} needs {need}"
        )
    kept = input_ids[:, input_ids.shape[1] - need :]
    return [Substep(s, lengths) for s in kept.split(sum(lengths), dim=1)]


def longest_segment(cfg: CompressionConfig, block_size: int, max_segment_length: int) -> int:
    """The longest segment `split_substeps` can cut from blocks of `block_size` tokens."""
    if not cfg.randomize_segments:
        return max(cfg.segment_lengths)
    return min(max_segment_length, math.ceil(block_size / cfg.training_substeps))


def _equal_slices(input_ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    """`n` contiguous slices with linspace boundaries, as the original does (lengths differ by at most 1)."""
    length = input_ids.shape[1]
    if length < 2 * n:
        raise ValueError(f"blocks of {length} tokens are too short for {n} training substeps")
    bounds = [round(i * length / n) for i in range(n + 1)]
    return [input_ids[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def random_segment_lengths(
    length: int,
    n: int,
    max_segment_length: int,
    generator: torch.Generator | None = None,
    multiple: int = 1,
) -> list[int]:
    """`n` segment lengths summing to `length`, each in [min_len, max_segment_length] (the original's rule).

    min_len = max(ceil((length - M) / (n - 1)), 2) guarantees no segment exceeds M; the n - 1 cut points
    are drawn without replacement, uniformly, from the `length - n * min_len` free tokens.
    With `multiple` > 1 the same rule runs on a grid of `multiple` tokens (every boundary is a multiple of
    it; the last segment also takes the `length % multiple` tokens left over), so only a few distinct segment
    shapes occur. A slice too short for the grid falls back to token granularity.
    """
    if n == 1:
        if length > max_segment_length:
            raise ValueError(
                f"a substep of {length} tokens is one segment longer than the {max_segment_length} allowed; "
                "raise compression.segments_per_substep or training_substeps"
            )
        return [length]
    units, rest = divmod(length, multiple)
    max_units = (max_segment_length - rest) // multiple
    min_units = max(math.ceil((units - max_units) / (n - 1)), math.ceil(2 / multiple))
    free = units - n * min_units
    if free < n - 1:
        if multiple > 1:
            return random_segment_lengths(length, n, max_segment_length, generator)
        raise ValueError(
            f"cannot cut {length} tokens into {n} segments of at most {max_segment_length} tokens "
            f"(each needs >= {min_units}); raise compression.training_substeps or segments_per_substep"
        )
    cuts = torch.multinomial(torch.ones(free), n - 1, replacement=False, generator=generator)
    points = [0, *sorted(cuts.tolist()), free]
    lengths = [(b - a + min_units) * multiple for a, b in zip(points[:-1], points[1:])]
    lengths[-1] += rest
    return lengths


def passed_vectors(cfg: CompressionConfig) -> int:
    """Summary vectors one segment passes on: summary_length, or (variable mode) every slot, the absent ones
    masked."""
    return cfg.summary_length if cfg.compression_mode == "fixed" else cfg.compression_max_len


def summary_positions(cfg: CompressionConfig) -> int:
    """Positions one segment's summary tokens occupy: summary_length, or (variable mode) `<sum>` plus every
    slot."""
    return cfg.summary_length if cfg.compression_mode == "fixed" else cfg.compression_max_len + 1


def sequence_positions(
    segment_lengths: list[list[int]], summary_length: int, accumulate: bool, tail: int | None = None
) -> list[int]:
    """Positions each segment's forward runs over, for one sequence: [softprompt; text; summary].

    `segment_lengths` holds each substep's segments in order; each segment passes on `summary_length` vectors
    and its summary tokens take `tail` positions (default `summary_length`). Every segment gets summary tokens
    except the last one of the step (its summaries would be unused, so the trainer does not ask for them).
    """
    tail = summary_length if tail is None else tail
    flat = [n for sub in segment_lengths for n in sub]
    positions, prompt = [], 0
    for i, n in enumerate(flat):
        last = i == len(flat) - 1
        positions.append(prompt + n + (0 if last else tail))
        prompt = prompt + summary_length if accumulate else summary_length
    return positions


def fixed_forward_lengths(cfg: CompressionConfig) -> set[int]:
    """The distinct lengths of [softprompt; segment; summary tokens] the decoder sees in a step with fixed
    boundaries: each segment of a block reads the summaries of those before it (accumulating) or of the last one,
    and the block's last segment makes none, so a block of many segments gives many lengths."""
    substeps = [list(cfg.segment_lengths)] * cfg.training_substeps
    return set(
        sequence_positions(substeps, passed_vectors(cfg), cfg.accumulate_summary, summary_positions(cfg))
    )


def segment_position_budget(model_config, cfg: CompressionConfig) -> int:
    """Longest segment whose positions fit the base model (`M`, docs/TRAINING.md "Positions budget").

    OPT gives softprompt and summary tokens no positions, so a segment may use all of
    `max_position_embeddings`. RoPE families (Llama, Mistral, Qwen) number the whole
    [softprompt; segment; summary] sequence, so the last segment of a step must leave room for the
    summaries accumulated before it plus its own summary tokens:
        M = max_position_embeddings - summary_length * (substeps * segments_per_substep)   (accumulating)
        M = max_position_embeddings - 2 * summary_length                                   (RMT, one summary)
    `compression.max_segment_length` overrides this (e.g. to stay inside a pretrained context on purpose).
    """
    if cfg.max_segment_length is not None:
        return cfg.max_segment_length
    from acomp.modeling import autocompressor_class

    max_pos = int(getattr(model_config, "max_position_embeddings", 0) or 0)
    if max_pos <= 0:
        raise ValueError(
            "the model config has no max_position_embeddings; set compression.max_segment_length"
        )
    if not autocompressor_class(model_config.model_type).position_rule.softprompt_consumes_positions:
        return max_pos
    per_segment = summary_positions(cfg)
    n_summaries = cfg.training_substeps * cfg.segments_per_substep if cfg.accumulate_summary else 2
    budget = max_pos - per_segment * n_summaries
    if budget < 2:
        raise ValueError(
            f"max_position_embeddings={max_pos} leaves no room for segments after "
            f"{n_summaries} summaries of {per_segment} positions each"
        )
    return budget


def segment_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A generator for one micro-batch's random boundaries: a pure function of (seed, step, micro, rank), so a
    resumed run draws exactly the boundaries the uninterrupted run would have drawn."""
    g = torch.Generator()
    # mod 2**64: torch refuses larger seeds; smaller ones are unchanged
    g.manual_seed(((seed * 1_000_003 + step) * 1_000_003 + micro * 65_537 + rank) % 2**64)
    return g
