"""The evaluation protocol (acomp.eval): what each condition scores, aggregation, reports, the launcher."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runs import load_script
from tiny_models import random_ids, tiny_model
from transformers import LlamaForCausalLM

from acomp.eval import (
    FULL_ATTENTION,
    NO_CONTEXT,
    SUMMARY,
    SUMMARY_VARIABLE,
    Condition,
    ProtocolConfig,
    evaluate,
    plan_conditions,
    report,
    score,
    select_blocks,
)

REPO = Path(__file__).resolve().parents[2]
E, S = 16, 16


def blocks(n: int = 6, length: int = 64) -> list[dict]:
    return [{"input_ids": random_ids(1, length, seed=i)[0], "domain": "ab"[i % 2]} for i in range(n)]


def test_full_attention_over_the_whole_block_is_a_plain_forward():
    model = tiny_model("llama")
    ids = torch.stack([b["input_ids"] for b in blocks(3)])
    c = ids.shape[1] - E
    got = score(model, ids, Condition(FULL_ATTENTION, c), E)
    # The same targets another way: the base class's own forward over the block, CE on the last E - 1 tokens.
    logits = LlamaForCausalLM.forward(model, input_ids=ids).logits.float()
    want = F.cross_entropy(logits[:, c:-1].transpose(1, 2), ids[:, c + 1 :], reduction="none").sum(dim=1)
    assert got.tokens == [E - 1] * 3
    assert got.nll == pytest.approx(want.tolist(), rel=1e-5)


def test_summary_with_no_segment_is_no_context_and_with_segments_matches_one_call():
    model = tiny_model("llama")
    ids = torch.stack([b["input_ids"] for b in blocks(2)])
    alone = score(model, ids, Condition(NO_CONTEXT), E)
    assert score(model, ids, Condition(SUMMARY, 0, ()), E).nll == alone.nll
    # Compress-then-score equals the single model call of the original protocol (last segment's NLL).
    summary = score(model, ids, Condition(SUMMARY, 2 * S, (S, S)), E)
    span = ids[:, -(2 * S + E) :]
    one_call = model(span, labels=span, segment_lengths=[S, S, E], return_logits=False)
    assert summary.nll == pytest.approx(one_call.segment_nll[:, -1].tolist(), rel=1e-5)
    assert summary.vectors == [2.0 * model.config.summary_length] * 2
    assert summary.nll != alone.nll


def test_plan_and_result_cover_the_same_targets_per_domain():
    model = tiny_model("llama")
    data = blocks(7)
    result = evaluate(
        model,
        data,
        ProtocolConfig(eval_segment=E, segment_length=S, fa_window=48, batch_size=3),
        progress=False,
    )
    names = [c.name for c in result.conditions]
    assert names == [
        "no_context",
        "summary_1",
        "summary_2",
        "summary_3",
        "full_attention_16",
        "full_attention_32",
    ]
    assert result.blocks == 7
    for name in names:
        overall = result.overall[name]
        assert overall.tokens == 7 * (E - 1)  # the same targets in every condition
        assert sum(d[name].tokens for d in result.domains.values()) == overall.tokens
        assert math.fsum(d[name].nll_sum for d in result.domains.values()) == pytest.approx(
            overall.nll_sum, rel=1e-12
        )
    assert {d: s["no_context"].blocks for d, s in result.domains.items()} == {"a": 4, "b": 3}
    assert model.training is False


def test_planner_errors_and_warnings():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs 4 x segment_length=16 \\+ eval_segment=16 = 80 tokens"):
        plan_conditions(model, ProtocolConfig(eval_segment=E, segment_length=S, max_context_segments=4), 64)
    with pytest.raises(ValueError, match="compression_mode 'variable'"):
        plan_conditions(model, ProtocolConfig(eval_segment=E, segment_length=S, variable=True), 64)
    with pytest.raises(ValueError, match="eval_segment=80 is longer than the blocks"):
        plan_conditions(model, ProtocolConfig(eval_segment=80), 64)
    plan = plan_conditions(model, ProtocolConfig(eval_segment=E, segment_length=S, fa_window=E), 64)
    assert not [c for c in plan.conditions if c.kind == FULL_ATTENTION]
    assert any("full attention skipped" in w for w in plan.warnings)
    plan = plan_conditions(model, ProtocolConfig(eval_segment=E, segment_length=S, fa_window=0), 64)
    assert not plan.warnings and plan.conditions[-1].kind == SUMMARY
    assert select_blocks(10, 4) == [0, 2, 5, 7] and select_blocks(3, None) == [0, 1, 2]


def test_the_planner_checks_lengths_against_the_positions():
    """Past max_position_embeddings a learned table (OPT) has no embedding: refused before any scoring; a RoPE
    model's full attention is warned about, as its summary conditions are."""
    opt, llama = tiny_model("opt"), tiny_model("llama")
    limit = opt.config.max_position_embeddings
    cfg = ProtocolConfig(eval_segment=E, segment_length=S, fa_window=limit + 16)
    with pytest.raises(ValueError, match=f"^fa_window={limit + 16} is longer than the model's max_pos"):
        plan_conditions(opt, cfg, 2 * limit)
    with pytest.raises(ValueError, match=f"^eval_segment={limit + 16} is longer than"):
        plan_conditions(
            opt, ProtocolConfig(eval_segment=limit + 16, fa_window=0, max_context_segments=0), 4 * limit
        )
    window = llama.config.max_position_embeddings + 16
    plan = plan_conditions(llama, replace(cfg, fa_window=window), 2 * window)
    assert any(w.startswith(f"fa_window={window} is longer than") for w in plan.warnings)


def test_a_model_that_does_not_compress_keeps_every_full_attention_context():
    """summary_length 0 (the quality benchmark's base): no summary conditions, every k x S full attention."""
    model = tiny_model("llama", summary_length=0)
    plan = plan_conditions(model, ProtocolConfig(eval_segment=E, segment_length=S), 64)
    assert [c.name for c in plan.conditions] == [
        "no_context", "full_attention_16", "full_attention_32", "full_attention_48"
    ]  # fmt: skip


def test_variable_length_conditions_count_their_vectors():
    model = tiny_model("llama", compression_mode="variable", compression_max_len=4)
    cfg = ProtocolConfig(eval_segment=E, segment_length=S, fa_window=0, stop_threshold=0.0)
    result = evaluate(model, blocks(2), cfg, progress=False)
    assert [c.name for c in result.conditions if c.kind == SUMMARY_VARIABLE] == [
        "summary_variable_1",
        "summary_variable_2",
        "summary_variable_3",
    ]
    # threshold 0: every segment stops after one vector; the fixed reading spends all 4 slots.
    assert result.overall["summary_variable_3"].summary_vectors == 3.0
    assert result.overall["summary_3"].summary_vectors == 12.0
    assert model.config.compress_stop_threshold is None  # restored


def test_a_stop_rule_override_applies_to_the_variable_conditions_and_is_restored(monkeypatch):
    import acomp.modeling.compressor as compressor

    flat = torch.full((4,), 0.3)  # every slot stops with p 0.3: S = 1, .7, .49, .34
    monkeypatch.setattr(
        compressor, "stop_probabilities", lambda logits, eoc: flat.expand(logits.shape[0], -1)
    )
    model = tiny_model(
        "llama", compression_mode="variable", compression_max_len=4, compress_stop_threshold=0.5
    )
    cfg = ProtocolConfig(eval_segment=E, segment_length=S, fa_window=0, max_context_segments=2)
    cumulative = evaluate(model, blocks(2), cfg, progress=False)  # the model's own rule, the default
    step = evaluate(model, blocks(2), replace(cfg, stop_rule="step"), progress=False)
    assert step.overall["summary_variable_2"].summary_vectors == 8.0  # p 0.3 never exceeds 0.5
    assert cumulative.overall["summary_variable_2"].summary_vectors == 4.0  # the median length: 2
    assert step.overall["summary_2"].summary_vectors == 8.0  # the fixed reading spends every slot
    assert model.config.compress_stop_rule == "cumulative"  # restored
    with pytest.raises(ValueError, match="stop_rule must be one of .* got 'median'"):
        replace(cfg, stop_rule="median").check()


def test_stop_threshold_sweep_scores_each_threshold_as_its_own_evaluation(tmp_path):
    """stop_thresholds add the variable conditions again per threshold: each set gives exactly what an
    evaluation at that one threshold gives (NLL and vectors), and the run's own threshold is left alone."""
    model = tiny_model("llama", compression_mode="variable", compression_max_len=4)
    cfg = ProtocolConfig(eval_segment=E, segment_length=S, fa_window=0, max_context_segments=2)
    swept = evaluate(model, blocks(2), replace(cfg, stop_thresholds=(0.0, 1.0, 0.0)), progress=False)
    assert [c.name for c in swept.conditions if c.kind == SUMMARY_VARIABLE] == [
        "summary_variable_1", "summary_variable_2", "summary_variable_1_t0.0", "summary_variable_2_t0.0",
        "summary_variable_1_t1.0", "summary_variable_2_t1.0",
    ]  # fmt: skip
    for threshold in (0.0, 1.0):
        alone = evaluate(model, blocks(2), replace(cfg, stop_threshold=threshold), progress=False)
        for k in (1, 2):
            got, want = (
                swept.overall[f"summary_variable_{k}_t{threshold!r}"],
                alone.overall[f"summary_variable_{k}"],
            )
            assert (got.nll_sum, got.summary_vectors) == (want.nll_sum, want.summary_vectors)
    assert (
        swept.overall["summary_variable_2_t0.0"].summary_vectors == 2.0
    )  # threshold 0: one vector a segment
    assert swept.overall["summary_variable_2_t1.0"].summary_vectors == 8.0  # threshold 1: every slot
    assert model.config.compress_stop_threshold is None
    assert (
        "| summary vectors (variable length), stop threshold 1.0, 2 segment(s) | 32 | 8.0 |"
        in report.markdown(swept)
    )
    conditions = {c["name"]: c for c in report.to_dict(swept)["conditions"]}
    assert conditions["summary_variable_2_t1.0"]["stop_threshold"] == 1.0
    assert conditions["summary_variable_2"]["stop_threshold"] is None
    assert report.plot(swept, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # A fixed-length model has no thresholds to sweep; thresholds outside [0, 1] and on other kinds are refused.
    plan = plan_conditions(tiny_model("llama"), replace(cfg, stop_thresholds=(0.5,)), 64)
    assert not [c for c in plan.conditions if c.kind == SUMMARY_VARIABLE]
    assert plan.warnings == [
        "stop_thresholds skipped: no variable-length conditions (a fixed-length model or variable=False)"
    ]
    # Thresholds that print alike at a few digits keep names of their own (0.1 + 0.2 is not 0.3).
    near = plan_conditions(model, replace(cfg, stop_thresholds=(0.3, 0.1 + 0.2, 1)), 64)
    names = [c.name for c in near.conditions if c.kind == SUMMARY_VARIABLE and c.stop_threshold is not None]
    assert names == [
        "summary_variable_1_t0.3", "summary_variable_2_t0.3", "summary_variable_1_t0.30000000000000004",
        "summary_variable_2_t0.30000000000000004", "summary_variable_1_t1.0", "summary_variable_2_t1.0",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="stop_thresholds must be in \\[0, 1\\], got 1.5"):
        replace(cfg, stop_thresholds=(1.5,)).check()
    with pytest.raises(ValueError, match="a stop threshold applies to summary_variable conditions"):
        Condition(SUMMARY, S, (S,), 0.5)


def test_variable_condition_scores_compact_summaries_as_the_masked_full_width():
    """summary_variable_k conditions on the kept vectors only: the same NLL as the full-width softprompt with
    its presence bias (threshold 0: one vector of each segment's 4 slots is kept)."""
    model = tiny_model(
        "llama", compression_mode="variable", compression_max_len=4, compress_stop_threshold=0.0
    )
    ids = torch.stack([b["input_ids"] for b in blocks(2)])
    got = score(model, ids, Condition(SUMMARY_VARIABLE, 2 * S, (S, S)), E)
    memory = model.compress_context(ids[:, -(2 * S + E) : -E], segment_lengths=[S, S])
    target = ids[:, -E:]
    full = model(target, labels=target, softprompt=memory.softprompt, softprompt_bias=memory.softprompt_bias)
    assert memory.softprompt.shape[1] == 8 and got.vectors == [2.0, 2.0]
    assert got.nll == pytest.approx(full.segment_nll[:, -1].tolist(), rel=1e-5)


def test_reports(tmp_path):
    model = tiny_model("llama")
    result = evaluate(model, blocks(4), ProtocolConfig(eval_segment=E, segment_length=S), progress=False)
    path = report.write_json(result, tmp_path / "r.json", {"model": "tiny"})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert data["meta"] == {"model": "tiny"} and data["blocks"] == 4
    assert set(data["gap_share"]) == {"summary_1", "summary_2", "summary_3"}
    table = report.markdown(result)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == len(result.conditions) + 1 and "60 tokens in 4 blocks" in table
    png = report.plot(result, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def saved_model_and_corpus(tmp_path_factory):
    from transformers import LlamaConfig

    from acomp import LlamaAutoCompressorModel
    from acomp.data import build_corpus

    root = tmp_path_factory.mktemp("eval")
    manifest = build_corpus(
        "stdlib",
        root / "corpus",
        train_tokenizer_vocab=300,
        block_size=128,
        limit_docs=24,
        val_fraction=0.5,
        progress=False,
    )
    config = LlamaConfig(
        vocab_size=manifest["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        eos_token_id=0,
    )
    config.summary_length = 3
    torch.manual_seed(0)
    LlamaAutoCompressorModel(config).save_pretrained(root / "model")
    return root / "model", root / "corpus"


ARGS = ["--eval-segment", "32", "--segment-length", "32", "--max-blocks", "7", "--no-progress"]


def _launcher():
    return load_script("launchers/eval.py", "eval_launcher")


def test_launcher_two_ranks_give_exactly_the_sums_of_one(saved_model_and_corpus, tmp_path):
    model, corpus = saved_model_and_corpus
    paths = ["--model", str(model), "--data", str(corpus)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1): same kernels, same bits
    try:
        assert _launcher().main([*paths, "--out", str(tmp_path / "one"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "launchers" / "eval.py"), *paths, "--out", str(tmp_path / "two"), *ARGS]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["blocks"] == two["blocks"] == 7
    names = [c["name"] for c in one["conditions"]]
    # 128-token blocks, 32-token segments: 3 summary conditions; FA window 96 -> 32 and 64 tokens of context.
    assert names == [
        "no_context",
        "summary_1",
        "summary_2",
        "summary_3",
        "full_attention_32",
        "full_attention_64",
    ]
    for a, b in zip(one["conditions"], two["conditions"]):
        assert a["overall"] == b["overall"]  # bit-identical: per-block results summed with math.fsum
        assert a["domains"] == b["domains"]
    assert (tmp_path / "two" / "ppl_vs_context.png").is_file() and (tmp_path / "two" / "results.md").is_file()


def test_launcher_reports_a_base_model_without_a_summary_table(saved_model_and_corpus, tmp_path):
    from transformers import LlamaForCausalLM

    from acomp import AutoCompressorModel

    model, corpus = saved_model_and_corpus
    config = AutoCompressorModel.from_pretrained(model).config
    del config.summary_length
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    out = tmp_path / "eval"
    argv = ["--model", str(tmp_path / "base"), "--data", str(corpus), "--out", str(out), *ARGS]
    assert _launcher().main(argv) == 0
    warning = f"{tmp_path / 'base'} has no trained summary table (embed_summary.weight)"
    assert any(
        w.startswith(warning) for w in json.loads((out / "results.json").read_text())["plan"]["warnings"]
    )
    assert f"Warning: {warning}" in (out / "results.md").read_text()


def test_launcher_rejects_bad_values(saved_model_and_corpus, tmp_path, capsys):
    launcher = _launcher()
    model, corpus = saved_model_and_corpus
    base = ["--model", str(model), "--data", str(corpus), "--out", str(tmp_path), "--no-progress"]
    assert launcher.main([*base, "--eval-segment", "1"]) == 2
    assert "eval_segment must be >= 2" in capsys.readouterr().err
    assert launcher.main([*base, "--stop-thresholds", "0.5", "1.5"]) == 2
    assert "stop_thresholds must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert launcher.main([*base, "--eval-segment", "1"]) == 2
    assert "eval_segment must be >= 2" in capsys.readouterr().err
    assert launcher.main([*base, "--eval-segment", "32", "--max-context-segments", "9"]) == 2
    assert "max_context_segments=9 needs" in capsys.readouterr().err
