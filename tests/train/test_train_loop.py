"""The loop's pieces in-process: substeps and segments, truncated BPTT, the schedule, MFU, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VOCAB, PlainEngine, tiny_model
from transformers import LlamaConfig, OPTConfig

from acomp.config import CompressionConfig, OptimConfig
from acomp.train import heldout_ppl, train_substep
from acomp.train.metrics import segment_flops
from acomp.train.optim import lr_factor
from acomp.train.segments import (
    Substep,
    longest_segment,
    random_segment_lengths,
    segment_generator,
    segment_position_budget,
    sequence_positions,
    split_substeps,
)


# ------------------------------------------------------------------------------------------ segmentation
def test_fixed_segments_keep_the_last_tokens():
    cfg = CompressionConfig(
        training_substeps=2, segments_per_substep=2, randomize_segments=False, segment_lengths=[3, 5]
    )
    ids = torch.arange(20).expand(2, -1)
    subs = split_substeps(ids, cfg, max_segment_length=100)
    assert [s.segment_lengths for s in subs] == [[3, 5], [3, 5]]
    assert torch.equal(torch.cat([s.input_ids for s in subs], dim=1), ids[:, 4:])
    with pytest.raises(ValueError, match="needs 16"):
        split_substeps(ids[:, :10], cfg, 100)


def test_random_segments_follow_the_original_rule():
    # OPT 6K: slices of 3072, 2 segments, M = 2048 -> each segment in [1024, 2048].
    g = torch.Generator().manual_seed(0)
    draws = [random_segment_lengths(3072, 2, 2048, g) for _ in range(200)]
    assert all(sum(d) == 3072 and 1024 <= min(d) and max(d) <= 2048 for d in draws)
    assert len({tuple(d) for d in draws}) > 50
    # Llama: M larger than the slice -> min_len 2.
    draws = [random_segment_lengths(64, 3, 1000, g) for _ in range(200)]
    assert all(sum(d) == 64 and min(d) >= 2 for d in draws)
    assert random_segment_lengths(10, 1, 10) == [10]
    with pytest.raises(ValueError, match="cannot cut 10 tokens into 4 segments"):
        random_segment_lengths(10, 4, 3)


@pytest.mark.parametrize(
    "block, substeps, per, max_segment, multiple, slack",
    [
        (301, 3, 2, 1000, 1, 2),  # slices of 100-101 tokens, the other segment at least 2
        (6144, 2, 2, 2048, 1, 0),  # OPT 6K: segments up to M = 2048
        (6149, 2, 3, 3896, 64, 400),  # on a grid, 3 segments: the longest cuts are rare
        (200, 4, 1, 1000, 1, 0),  # one segment per substep: the slice
        (128, 2, 2, 40, 8, 0),
    ],
)
def test_longest_segment_bounds_every_cut(block, substeps, per, max_segment, multiple, slack):
    """`longest_segment` (the chunked loss's slice count under ZeRO-3 rests on it) is never exceeded by a
    random cut, and the longest cuts drawn come within `slack` of it."""
    cfg = CompressionConfig(
        training_substeps=substeps,
        segments_per_substep=per,
        randomize_segments=True,
        segment_multiple=multiple,
    )
    bound = longest_segment(cfg, block, max_segment)
    ids = torch.zeros(1, block, dtype=torch.long)
    seen = max(
        n
        for step in range(2000)
        for sub in split_substeps(ids, cfg, max_segment, segment_generator(0, step, 0, 0))
        for n in sub.segment_lengths
    )
    assert bound - slack <= seen <= bound
    fixed = CompressionConfig(randomize_segments=False, segment_lengths=[3, 9, 5])
    assert longest_segment(fixed, block, max_segment) == 9


def test_random_substeps_are_equal_slices_and_reproducible():
    cfg = CompressionConfig(training_substeps=3, segments_per_substep=2, randomize_segments=True)
    ids = torch.arange(301).unsqueeze(0)
    a = split_substeps(ids, cfg, 1000, segment_generator(0, step=5, micro=0, rank=0))
    b = split_substeps(ids, cfg, 1000, segment_generator(0, step=5, micro=0, rank=0))
    c = split_substeps(ids, cfg, 1000, segment_generator(0, step=6, micro=0, rank=0))
    assert [s.input_ids.shape[1] for s in a] == [100, 101, 100]
    assert torch.equal(torch.cat([s.input_ids for s in a], dim=1), ids)
    assert [s.segment_lengths for s in a] == [s.segment_lengths for s in b]
    assert [s.segment_lengths for s in a] != [s.segment_lengths for s in c]


def test_any_seed_draws_boundaries():
    """Seeds whose mixed value passes 2**64 (date-like ones) wrap instead of failing at the first step; smaller
    ones draw what they drew before."""
    cfg = CompressionConfig(training_substeps=2, segments_per_substep=2, randomize_segments=True)
    ids = torch.arange(301).unsqueeze(0)
    assert split_substeps(ids, cfg, 1000, segment_generator(20240101, step=3, micro=1, rank=0))
    g = segment_generator(7, step=3, micro=1, rank=2)
    expected = torch.Generator().manual_seed((7 * 1_000_003 + 3) * 1_000_003 + 65_537 + 2)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=expected))


def test_position_budget():
    cfg = CompressionConfig(summary_length=50, training_substeps=2, segments_per_substep=2)
    llama = LlamaConfig(max_position_embeddings=4096)
    assert segment_position_budget(llama, cfg) == 4096 - 4 * 50
    assert segment_position_budget(OPTConfig(max_position_embeddings=2048), cfg) == 2048
    cfg.accumulate_summary = False
    assert segment_position_budget(llama, cfg) == 4096 - 2 * 50
    cfg.max_segment_length = 1000
    assert segment_position_budget(llama, cfg) == 1000


# ----------------------------------------------------------------------------------------- truncated BPTT
def capture_input_embeddings(model):
    """Every forward's input embeddings, with .grad kept (the model embeds a whole call at once)."""
    seen = []

    def hook(module, args, output):
        output.retain_grad()
        seen.append(output)

    model.get_input_embeddings().register_forward_hook(hook)
    return seen


def test_bptt_gradients_flow_within_a_substep_and_stop_between_substeps():
    model = tiny_model("llama").train()
    engine = PlainEngine(model, target_last_segment=True)
    embeds = capture_input_embeddings(model)
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    first, second = Substep(ids[:, :16], [8, 8]), Substep(ids[:, 16:], [8, 8])

    softprompt = train_substep(engine, first, None, carry=True).softprompt
    # Within substep 1: the loss of its segment 2 reached segment 1's tokens (only through the summaries).
    grad_first = embeds[0].grad.clone()
    assert grad_first[:, :8].abs().sum() > 0
    assert softprompt.vectors.shape == (2, 6, 32) and not softprompt.vectors.requires_grad

    train_substep(engine, second, softprompt, carry=False)
    # Substep 2's loss sent nothing back into substep 1 (its graph and gradients are untouched)...
    assert torch.equal(embeds[0].grad, grad_first)
    # ...although substep 2 did depend on substep 1's summaries (non-detached, the gradient would exist).
    assert embeds[1].grad[:, :8].abs().sum() > 0
    sp = model(ids[:, :16], segment_lengths=[8, 8], output_softprompt=True).softprompt
    sp.retain_grad()
    out = model(ids[:, 16:], labels=ids[:, 16:], segment_lengths=[8, 8], softprompt=sp)
    out.segment_nll[:, -1].sum().backward()
    assert sp.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- schedule, MFU
def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="linear")
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.0)
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100) == pytest.approx(0.55)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(7, OptimConfig(warmup_steps=0, schedule="constant"), 10) == 1.0


def test_flops_count_summary_and_softprompt_positions():
    # 2 substeps x 2 segments of 100, kappa 10, accumulating: prompts 0, 10, 20, 30; the last segment has no
    # summary tokens (its summaries would go unused).
    assert sequence_positions([[100, 100], [100, 100]], 10, True) == [110, 120, 130, 130]
    assert sequence_positions([[100, 100], [100, 100]], 10, False) == [110, 120, 120, 110]
    n, layers, d = 1_000_000, 2, 64
    assert segment_flops(n, layers, d, 110) == 6 * n * 110 + 12 * layers * d * (110 * 111 / 2)  # causal pairs
    assert segment_flops(n, layers, d, 110, causal=False) == 6 * n * 110 + 12 * layers * d * 110**2  # PaLM


# -------------------------------------------------------------------------------------------- evaluation
def test_heldout_ppl_scores_the_same_targets():
    model = tiny_model("llama").train()
    blocks = [torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = heldout_ppl(model, [{"input_ids": b} for b in blocks], [8, 8, 16])
    assert result["blocks"] == 3 and result["tokens"] == 3 * 15
    # No-context reference by hand: the last 16 tokens alone, targets = tokens 2..16.
    nll = 0.0
    for b in blocks:
        logits = model(b[-16:].unsqueeze(0)).logits[0]
        nll += torch.nn.functional.cross_entropy(logits[:-1], b[-15:], reduction="sum").item()
    assert result["no_context_ppl"] == pytest.approx(math.exp(nll / 45), rel=1e-5)
    assert result["summary_ppl"] != result["no_context_ppl"]
    assert model.training  # the caller's mode is restored
    # max_blocks picks blocks spread over the split, as the eval protocol does: of 6, blocks 0 and 3.
    six = [torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    spread = heldout_ppl(model, six, [8, 8, 16], max_blocks=2)
    assert spread == heldout_ppl(model, [six[0], six[3]], [8, 8, 16])


def test_random_segments_on_a_grid():
    g = torch.Generator().manual_seed(0)
    draws = [random_segment_lengths(3072 + 5, 2, 2048, g, multiple=128) for _ in range(100)]
    assert all(sum(d) == 3077 and max(d) <= 2048 and d[0] % 128 == 0 and (d[1] - 5) % 128 == 0 for d in draws)
    assert len({tuple(d) for d in draws}) <= 9  # 1024..2048 in steps of 128


@pytest.mark.parametrize(
    "length, max_segment, multiple, first_lengths",
    [
        # The original draws the cut from the free tokens 0..free-1: a first segment in [min, L - min - 1].
        (3072, 2048, 64, range(1024, 1985, 64)),  # OPT 6K: [1024, 2047] in tokens, on the grid
        (3072, 3896, 64, range(64, 2945, 64)),  # Llama-2 6K: [2, 3069] in tokens, on the grid
        (300, 3896, 1, range(2, 298)),  # multiple 1: exactly the original rule (tokens)
    ],
)
def test_segment_multiple_puts_boundaries_on_a_grid_under_the_original_rule(
    length, max_segment, multiple, first_lengths
):
    """Every boundary is a multiple of `segment_multiple`, every length within the original's bounds, and
    every grid length the original's rule allows occurs (uniformly: no value more than 3x another)."""
    cfg = CompressionConfig(training_substeps=2, segments_per_substep=2, segment_multiple=multiple)
    ids = torch.zeros(1, 2 * length, dtype=torch.long)
    seen = {}
    for step in range(3000 if multiple > 1 else 20000):
        for sub in split_substeps(ids, cfg, max_segment, segment_generator(0, step, 0, 0)):
            first, second = sub.segment_lengths
            assert first + second == length and first % multiple == 0
            assert max(first, second) <= max_segment and min(first, second) >= 2
            seen[first] = seen.get(first, 0) + 1
    assert sorted(seen) == list(first_lengths)
    assert max(seen.values()) < 3 * min(seen.values())
