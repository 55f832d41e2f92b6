"""benchmarks/length_headroom.py: the room for learned lengths, from fixed-length runs' per-block records, on
synthetic runs whose answer is known."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from length_headroom import from_results, headroom, main  # noqa: E402

TOKENS = 63
GAP = 0.5  # nats: no context minus full attention


def run(k: int, difficulty: list[float], gain: list[float]) -> dict:
    """results.json of a fixed-length run: block b's no-context loss difficulty[b], one segment gains gain[b]."""
    records = [
        {
            "index": b,
            "nll": {"no_context": d * TOKENS, "summary_1": (d - g) * TOKENS},
            "tokens": {"no_context": TOKENS, "summary_1": TOKENS},
        }
        for b, (d, g) in enumerate(zip(difficulty, gain))
    ]
    rows = [{"name": "no_context", "loss": 3.0}, {"name": "full_attention_1024", "loss": 3.0 - GAP}]
    return {
        "settings": {"summary_length": k},
        "autocompressor": {"records": records},
        "headline": {"rows": rows, "fa": "full_attention_1024"},
    }


N = 100
DIFFICULTY = [3.0 + 0.01 * b for b in range(N)]  # the second half is the harder one


def test_value_that_follows_difficulty_is_found_by_the_content_rule():
    lo = run(2, DIFFICULTY, [0.1] * N)
    hi = run(10, DIFFICULTY, [0.1 + (0.2 if b >= N // 2 else 0.0) for b in range(N)])
    (row,) = headroom(*from_results([(2, lo), (10, hi)]))
    assert (row["k_lo"], row["k_hi"], row["blocks"], row["gap"]) == (2, 10, N, GAP)
    assert row["value"] == pytest.approx(0.1)  # the extra vectors are worth 0.1 nats on average
    # k=10 on the hard half: 0.2 * 1/2 - 0.1 * 1/2 = 0.05 nats over the blind split, as the oracle finds
    assert row["content"] == pytest.approx(0.05) and row["oracle"] == pytest.approx(0.05)
    assert row["spearman"] > 0.8 and row["replicate_oracle"] is None


def test_value_unrelated_to_difficulty_leaves_the_content_rule_nothing():
    hi_gain = [0.1 + (0.2 if b % 2 == 0 else 0.0) for b in range(N)]  # even blocks, in both halves alike
    (row,) = headroom(*from_results([(2, run(2, DIFFICULTY, [0.1] * N)), (10, run(10, DIFFICULTY, hi_gain))]))
    assert row["content"] == pytest.approx(0.0, abs=1e-12)
    assert row["oracle"] == pytest.approx(0.05)  # what a rule that knew the value would win
    assert row["content_se"] > 0


def test_replicates_are_averaged_and_give_the_noise_share_of_the_oracle():
    noise = [0.02 if b % 2 else -0.02 for b in range(N)]
    lo_a = run(2, DIFFICULTY, [0.1 + e for e in noise])
    lo_b = run(2, DIFFICULTY, [0.1 - e for e in noise])
    (row,) = headroom(*from_results([(2, lo_a), (2, lo_b), (10, run(10, DIFFICULTY, [0.1] * N))]))
    assert row["value"] == pytest.approx(0.0, abs=1e-12)  # the replicates' noise cancels in their mean
    # between the replicates the differences are +-0.04: picking the positive half wins 0.04 * 1/2 = 0.02
    assert row["replicate_oracle"] == pytest.approx(0.02)


def test_one_length_gives_no_rows_and_the_command_reads_a_quality_directory(tmp_path, capsys):
    assert headroom(*from_results([(2, run(2, DIFFICULTY, [0.1] * N))])) == []
    runs = {"default": run(50, DIFFICULTY, [0.3] * N), "k2": run(2, DIFFICULTY, [0.1] * N)}
    lr = run(50, DIFFICULTY, [0.9] * N)  # another lever's arm: not a frontier run
    table = [
        {"arm": "default", "mode": "fixed", "changes": {}},
        {"arm": "k2", "mode": "fixed", "changes": {"summary_length": 2}},
        {"arm": "lr", "mode": "fixed", "changes": {"finetune_lr": 3e-3}},
        {"arm": "var", "mode": "variable", "changes": {"compression.compression_mode": "variable"}},
    ]
    (tmp_path / "ablation.json").write_text(json.dumps(table))
    (tmp_path / "results.json").write_text(json.dumps(runs["default"]))
    for arm, data in (("k2", runs["k2"]), ("lr", lr)):
        (tmp_path / "arms" / arm).mkdir(parents=True)
        (tmp_path / "arms" / arm / "results.json").write_text(json.dumps(data))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 2 / 50 | 100 | +0.2000 (+40.0%) |" in out  # 0.2 nats of the 0.5 gap; the lr arm left out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "arms")])
    assert e.value.code == 2
