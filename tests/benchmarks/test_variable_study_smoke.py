"""benchmarks/variable_study.py --smoke: the base, two fixed arms and a variable arm, each scored and in the table
(seconds: plumbing, not figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_variable_study_smoke_trains_scores_and_plots_each_arm(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "benchmarks" / "variable_study.py"), "--smoke", "--quiet"]
    cmd += ["--fixed", "2", "4", "--lambdas", "0.3", "--out", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [(arm["label"], arm["mode"]) for arm in results["arms"]] == [
        ("k=2", "fixed"),
        ("k=4", "fixed"),
        ("lambda=0.3", "variable"),
    ]
    for arm in results["arms"]:
        assert arm["summary_ppl"] > 0 and 1 <= arm["mean_vectors_per_segment"] <= 16
    start = results["start_stop_probability"]  # the zero stop row's and the base's own, at the summary slots
    assert start.keys() == {"zero_row", "base_row"} and all(0 < p < 1 for p in start.values())
    fixed, _, variable = results["arms"]
    assert fixed["length_loss_spearman"] is None  # the same number of vectors everywhere
    corr = variable["length_loss_spearman"]  # None too if the variable arm kept one length everywhere
    assert corr is None or -1.0 <= corr <= 1.0
    config = json.loads((out / "lambda_0.3" / "final" / "config.json").read_text())
    assert config["compression_mode"] == "variable" and config["compression_lambda"] == 0.3
    table = (out / "results.md").read_text()
    assert "| lambda=0.3 | variable |" in table
    # The two fixed lengths' per-block losses give the room for learned lengths (length_headroom.py).
    assert len(fixed["block_losses"]) == fixed["blocks"] and "| 2 / 4 |" in table
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
