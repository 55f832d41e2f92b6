"""benchmarks/quality.py --smoke: every stage (corpus, budgeted pretraining and fine-tuning, the evaluation
protocol, the reports) at toy scale on CPU, as the GPU run does them at full scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quality_smoke_runs_every_stage(tmp_path):
    out = tmp_path / "quality"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    data = json.loads((out / "results.json").read_text())
    rows = {row["name"]: row for row in data["headline"]["rows"]}
    assert list(rows) == ["no_context", "summary_1", "summary_2", "summary_3", "full_attention_192"]
    assert [rows[f"summary_{k}"]["summary_vectors"] for k in (1, 2, 3)] == [4.0, 8.0, 12.0]
    assert len({row["tokens"] for row in rows.values()}) == 1  # the same targets in every condition
    assert (
        rows["no_context"]["gap_closed_loss"] == 0.0 and rows["full_attention_192"]["gap_closed_loss"] == 1.0
    )
    base = [(row["condition"], row["context_tokens"]) for row in data["headline"]["base"]]
    assert base == [("base: no context", 0), ("base: full attention", 192)]
    ac = data["autocompressor"]
    assert set(ac["conditions"][0]["domains"]) == {
        "stdlib",
        "site-packages",
    }  # both sources, held out by document
    for stage in ("pretrain", "finetune"):
        info = json.loads((out / stage / "stage.json").read_text())
        assert info["steps"] >= 2 and (out / stage / "final" / "model.safetensors").is_file()
    assert data["info"]["model_config"]["summary_length"] == 4
    assert (out / "ppl_vs_context.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 8 summary vectors | 128 |" in (out / "results.md").read_text()
