"""benchmarks/copy_split.py: the scored targets split into copies from full attention's context and the rest."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model

from acomp.eval.protocol import (
    FULL_ATTENTION,
    NO_CONTEXT,
    SUMMARY,
    SUMMARY_VARIABLE,
    Condition,
    score,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from copy_split import CopySplitConfig, copy_split, copy_targets  # noqa: E402

CFG = CopySplitConfig(segment=8, segments=2, eval_segment=8, fa_context=12, ngram=3, max_blocks=6, batch=4)


def test_a_copy_continues_an_ngram_of_the_context_not_one_of_the_segment_itself():
    context = [5, 6, 7, 8, 9, 5, 6]  # its 3-grams: 5 6 7, 6 7 8, 7 8 9, 8 9 5, 9 5 6
    segment = [9, 5, 6, 7, 1, 5, 6, 7]
    assert copy_targets(context, segment, ngram=3) == [
        False,  # 6 9 5: straddles the boundary, not in the context
        True,  # 9 5 6
        True,  # 5 6 7
        False,  # 6 7 1
        False,  # 7 1 5
        False,  # 1 5 6
        False,  # 5 6 7 again: it ended earlier inside the segment, so no context is needed to copy it
    ]
    assert copy_targets([1, 2, 3], [1, 2, 3], ngram=2) == [True, True]
    assert copy_targets([1, 2, 3], [1, 2, 1, 2], ngram=2) == [True, False, False]


def test_parts_add_up_to_the_protocols_scores():
    # The same blocks and conditions scored by the protocol: each part's losses, weighted by its targets, give
    # the protocol's loss (a reference computed as summed NLL, without logits).
    model = tiny_model("llama", summary_length=3).eval()
    blocks = [random_ids(1, 30, seed=s)[0] for s in range(6)]
    # Half of the blocks repeat their context in the scored segment: copies exist.
    for b in blocks[:3]:
        b[-8:] = b[-14:-6].clone()
    got = copy_split(model, blocks, CFG)
    ids = torch.stack([b[-max(2 * 8, 12) - 8 :] for b in blocks])
    conditions = {
        NO_CONTEXT: Condition(NO_CONTEXT),
        SUMMARY: Condition(SUMMARY, 16, (8, 8)),
        FULL_ATTENTION: Condition(FULL_ATTENTION, 12),
    }
    copies, rest = got["copy"]["targets"], got["rest"]["targets"]
    assert copies + rest == 6 * 7 and copies > 0 and rest > 0
    assert got["copy_share_of_targets"] == pytest.approx(copies / 42)
    for name, cond in conditions.items():
        s = score(model, ids, cond, 8)
        expected = math.fsum(s.nll) / sum(s.tokens)
        mixed = (copies * got["copy"][f"loss_{name}"] + rest * got["rest"][f"loss_{name}"]) / 42
        assert mixed == pytest.approx(expected, rel=1e-5)
    for part in ("copy", "rest"):
        p = got[part]
        closed = (p["loss_no_context"] - p["loss_summary"]) / (
            p["loss_no_context"] - p["loss_full_attention"]
        )
        assert p["gap_closed"] == pytest.approx(closed)
    gains = {
        p: got[p]["targets"] * (got[p]["loss_no_context"] - got[p]["loss_full_attention"])
        for p in ("copy", "rest")
    }
    assert got["copy_share_of_fa_gain"] == pytest.approx(gains["copy"] / sum(gains.values()))
    assert got["blocks"] == 6


def test_a_variable_model_is_split_behind_the_vectors_its_own_stopping_keeps():
    # the protocol's summary_variable condition, as the variable rows of quality.py's ablation line
    # threshold 0: it stops at once, so its kept vectors differ from every slot (the fixed condition's reading)
    model = tiny_model(
        "llama", compression_mode="variable", compression_max_len=3, compress_stop_threshold=0.0
    ).eval()
    blocks = [random_ids(1, 30, seed=s)[0] for s in range(4)]
    for b in blocks[:2]:
        b[-8:] = b[-14:-6].clone()
    got = copy_split(model, blocks, CFG)
    ids = torch.stack([b[-24:] for b in blocks])
    s = score(model, ids, Condition(SUMMARY_VARIABLE, 16, (8, 8)), 8)
    expected = math.fsum(s.nll) / sum(s.tokens)
    copies, rest = got["copy"]["targets"], got["rest"]["targets"]
    mixed = (copies * got["copy"]["loss_summary"] + rest * got["rest"]["loss_summary"]) / (copies + rest)
    assert mixed == pytest.approx(expected, rel=1e-5)
    every_slot = score(model, ids, Condition(SUMMARY, 16, (8, 8)), 8)
    assert math.fsum(every_slot.nll) / sum(every_slot.tokens) != pytest.approx(expected, rel=1e-5)


def test_short_blocks_are_refused():
    with pytest.raises(ValueError, match="shorter than 24"):
        copy_split(tiny_model("llama"), [random_ids(1, 20)[0]] * 2, CFG)
