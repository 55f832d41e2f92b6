"""benchmarks/summary_profile.py: lengths kept against content, and the cost of decoding behind them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import random_ids, tiny_model

import acomp.modeling.compressor as compressor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from summary_profile import (  # noqa: E402
    ProfileConfig,
    decode_ms_per_token,
    kv_bytes_per_token,
    pearson,
    profile,
    ranks,
    spearman,
)

MAX_LEN = 4
CFG = ProfileConfig(segment=8, segments=2, max_blocks=4, batch=4, prompt_tokens=3, new_tokens=5)


def test_correlations_match_numpy_and_ranks_average_ties():
    xs, ys = [1.0, 4.0, 2.0, 2.0, 9.0], [0.3, 0.1, 0.7, 0.2, 0.5]
    assert pearson(xs, ys) == pytest.approx(np.corrcoef(xs, ys)[0, 1])
    assert ranks(xs) == [0.0, 3.0, 1.5, 1.5, 4.0]
    assert spearman(xs, [x**3 for x in xs]) == pytest.approx(1.0)  # any increasing map: rank correlation 1
    assert pearson([2.0] * 5, ys) is None  # a fixed-length model: nothing to correlate


def test_variable_lengths_pair_with_each_segments_own_no_context_loss(monkeypatch):
    # Per block, stop after vector 1, 2, 4 and 3 (threshold 0.5 on forced stop probabilities).
    pattern = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float32)
    monkeypatch.setattr(
        compressor, "stop_probabilities", lambda logits, eoc: pattern.expand(logits.shape[0], -1)
    )
    model = tiny_model(
        "llama", compression_mode="variable", compression_max_len=MAX_LEN, compress_stop_threshold=0.5
    )
    blocks = [random_ids(1, 30, seed=s)[0] for s in range(4)]
    got = profile(model, blocks, CFG)

    lengths = [1, 2, 4, 3]
    expected_pairs = []
    for j in range(CFG.segments):  # segment j of every block: its tokens read alone, as a plain LM
        for block, length in zip(blocks, lengths):
            text = block[-19:][j * 8 : (j + 1) * 8][None]
            out = model(text, labels=text)
            expected_pairs.append([float(length), out.loss.item()])
    np.testing.assert_allclose(got["pairs"], expected_pairs, rtol=1e-5)
    assert got["mean_vectors_per_segment"] == pytest.approx(2.5)
    # every length kept by a quarter of the segments: the tie goes to the shortest
    assert (got["commonest_length"], got["commonest_length_share"]) == (1.0, 0.25)
    xs, ys = zip(*expected_pairs)
    assert got["length_loss_pearson"] == pytest.approx(pearson(list(xs), list(ys)), rel=1e-5)
    # The cache holds the compacted summaries: the longest sample's kept vectors (4 per segment), not 2 x 4 slots
    # plus masks; then the prompt and the generated tokens.
    assert got["cache_summary_slots"] == 2 * 4
    assert got["kv_bytes_per_sample"] == kv_bytes_per_token(model) * (8 + 3 + 5)
    assert got["decode_batch"] == 4 and got["decode_ms_per_token"] > 0


def _forced_stops(monkeypatch, probs: list[float]):
    stops = torch.tensor(probs)
    monkeypatch.setattr(
        compressor, "stop_probabilities", lambda logits, eoc: stops.expand(logits.shape[0], -1)
    )
    return tiny_model(
        "llama", compression_mode="variable", compression_max_len=MAX_LEN, compress_stop_threshold=0.5
    )


def test_certain_stops_read_the_same_in_training_and_at_inference(monkeypatch):
    # Stop probabilities of exactly 0 or 1: soft presence is hard presence, so both losses agree.
    model = _forced_stops(monkeypatch, [0.0, 1.0, 0.0, 0.0])
    got = profile(model, [random_ids(1, 30, seed=s)[0] for s in range(4)], CFG)
    assert got["nll_soft"] == pytest.approx(got["nll_hard"], rel=1e-6)
    assert got["soft_slots_per_segment"] == 2.0 and got["mean_vectors_per_segment"] == 2.0


def test_soft_presence_keeps_faint_slots_that_inference_drops(monkeypatch):
    # p = 0.95 at every slot: inference keeps 1 vector; training's survivals 1, 0.05, 0.0025, ... keep 2 above
    # SOFT_PRESENT, and the faint second slot changes what the next segment reads.
    model = _forced_stops(monkeypatch, [0.95] * MAX_LEN)
    blocks = [random_ids(1, 30, seed=s)[0] for s in range(4)]
    got = profile(model, blocks, CFG)
    assert got["mean_vectors_per_segment"] == 1.0 and got["soft_slots_per_segment"] == 2.0
    assert got["nll_soft"] != pytest.approx(got["nll_hard"], rel=1e-6)
    model.config.training_presence = "sampled"  # a model trained with sampled lengths: still the soft reading
    assert profile(model, blocks, CFG)["nll_soft"] == pytest.approx(got["nll_soft"], rel=1e-6)
    assert model.config.training_presence == "sampled"
    # The hard side is the protocol's own reading: segment 2 behind segment 1's compacted summary.
    with torch.no_grad():
        nll = tokens = 0.0
        for block in blocks:
            ids = block[-19:][:16][None]
            memory = model.eval().compress_context(ids[:, :8], segment_lengths=[8])
            out = model(ids[:, 8:], labels=ids[:, 8:], softprompt=memory.summary.compact())
            nll += out.segment_nll.sum().item()
            tokens += out.segment_tokens.sum().item()
    assert got["nll_hard"] == pytest.approx(nll / tokens, rel=1e-5)


def test_fixed_model_keeps_its_length_everywhere():
    model = tiny_model("llama", summary_length=3)
    got = profile(model, [random_ids(1, 19, seed=s)[0] for s in range(4)], CFG)
    assert {length for length, _ in got["pairs"]} == {3.0}
    assert (got["commonest_length"], got["commonest_length_share"]) == (3.0, 1.0)
    assert got["length_loss_pearson"] is None and got["length_loss_spearman"] is None
    assert got["nll_hard"] is None and got["soft_slots_per_segment"] is None  # nothing soft to compare
    assert got["cache_summary_slots"] == 6
    # Llama: 2 layers x K and V x 2 KV heads x head dim 8 x 4 bytes (fp32) per position.
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 8 * 4


def test_untimed_profile_is_the_same_but_the_decode_time_which_comes_alone_later():
    model = tiny_model("llama", summary_length=3).train()
    blocks = [random_ids(1, 19, seed=s)[0] for s in range(4)]
    timed, untimed = profile(model, blocks, CFG), profile(model, blocks, CFG, time_decode=False)
    assert untimed["decode_ms_per_token"] is None and timed["decode_ms_per_token"] > 0
    assert {k: v for k, v in untimed.items() if k != "decode_ms_per_token"} == {
        k: v for k, v in timed.items() if k != "decode_ms_per_token"
    }
    assert decode_ms_per_token(model, blocks, CFG) > 0
    assert model.training  # each call gives the model back in the mode it came in


def test_short_blocks_are_refused():
    with pytest.raises(ValueError, match="shorter than 2 x 8"):
        profile(tiny_model("llama"), [random_ids(1, 12)[0]] * 2, CFG)
