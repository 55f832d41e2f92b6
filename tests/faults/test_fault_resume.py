"""Resuming with what a user really has: a truncated file in the newest checkpoint, a config whose model shape
changed, a changed learning rate or schedule, a `train.resume` that is not a checkpoint.

One chain of runs on one output directory (each launcher start costs seconds of imports): checkpoints at
steps 4 and 6; a resume with another hidden_size is refused before anything is built; a truncated file in
step 6 makes the next run fall back to step 4, naming the file, and reproduce the reference losses bitwise;
a last resume with another lr and schedule applies them from its first step.
"""

from __future__ import annotations

import json

import pytest
import torch
from fault_helpers import (
    REFERENCE_STEPS,
    assert_checkpoints_complete,
    assert_no_traceback,
    error_lines,
    records,
    reference_config,
)
from runs import launch, losses, write_config

from acomp.config import OptimConfig
from acomp.train.checkpoint import FILES_FILE, Checkpointer, ResumeError
from acomp.train.distributed import Dist
from acomp.train.optim import lr_factor

pytestmark = pytest.mark.slow

DIST = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_a_damaged_checkpoint_another_shape_and_new_settings_on_resume(corpus, reference, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, max_steps=6))
    launch(config)  # checkpoints at steps 2, 4, 6; the last 2 kept
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    config_yaml = (out / "config.yaml").read_text()

    # Another model shape: one line before anything is built; config.yaml still the run's.
    proc = launch(config, ["model.arch.hidden_size=96"], expect_rc=2, timeout=240)
    output = proc.stdout + proc.stderr
    assert_no_traceback(output)
    assert error_lines(output) == [
        f"config error: model.arch.hidden_size is 96 but checkpoint {root / 'step_00000006'} was trained with "
        f"64: resuming needs the same model shape. Set it back, or start a new run in another "
        f"train.output_dir"
    ]
    assert (out / "config.yaml").read_text() == config_yaml

    # A truncated file in the newest checkpoint: the run says which, resumes from step 4, and the losses are
    # the uninterrupted run's.
    bad = root / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate(size // 2)
    proc = launch(config, [f"train.max_steps={REFERENCE_STEPS}"])
    assert (
        f"warning: checkpoint {root / 'step_00000006'} is damaged: {bad} is {size // 2} bytes but was written "
        f"with {size} (truncated); set aside as damaged-step_00000006; resuming from step_00000004 instead"
    ) in proc.stdout, proc.stdout[-3000:]
    assert f"resumed from {root / 'step_00000004'} at step 4" in proc.stdout
    assert [r["step"] for r in records(out)] == list(range(1, REFERENCE_STEPS + 1))
    assert losses(out) == reference
    assert (root / "damaged-step_00000006").is_dir()  # kept to inspect, out of the step_* namespace
    assert_checkpoints_complete(out)

    # Another lr, schedule and length: applied from the first resumed step, as a run with them would have it.
    changes = ["train.max_steps=14", "optim.lr=5e-4", "optim.schedule=linear", "optim.min_lr_ratio=0.5"]
    proc = launch(config, changes)
    assert (
        "changed since that checkpoint, applied from step 11 on: optim.lr 0.001 -> 0.0005, optim.schedule "
        "'constant' -> 'linear', optim.min_lr_ratio 0.0 -> 0.5, train.max_steps 10 -> 14"
    ) in proc.stdout, proc.stdout[-3000:]
    now = OptimConfig(lr=5e-4, schedule="linear", warmup_steps=0, min_lr_ratio=0.5)
    resumed = records(out)[REFERENCE_STEPS:]
    assert [r["step"] for r in resumed] == [11, 12, 13, 14]
    for r in resumed:  # the lr a step uses: the schedule after r["step"] - 1 updates
        assert r["lr"] == pytest.approx(5e-4 * lr_factor(r["step"] - 1, now, 14), rel=1e-12), r
    assert "lr: 0.0005" in (out / "config.yaml").read_text()

    # The finished run again: it says so, trains nothing and logs no step twice.
    proc = launch(config, changes)
    assert "the run is finished (train.max_steps=14): nothing to train" in proc.stdout, proc.stdout[-3000:]
    assert [r["step"] for r in records(out)] == list(range(1, 15))


def fake_checkpoint(root, step: int, files: dict[str, int]):
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    for name, size in files.items():
        (path / name).write_bytes(b"x" * size)
    (path / FILES_FILE).write_text(json.dumps({"files": files}))
    return path


def test_resume_paths_that_cannot_be_used_are_refused_by_name(tmp_path):
    """Decided before any model is built (Checkpointer.resolve runs first in run())."""
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", 2, DIST)
    with pytest.raises(ResumeError, match=r"^train.resume='/nonexistent': no such directory$"):
        ckpt.resolve("/nonexistent")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ResumeError, match=r"is not a checkpoint directory \(no trainer_state_rank0.pt"):
        ckpt.resolve(str(tmp_path / "notes"))
    other = tmp_path / "other" / "checkpoints"
    good = fake_checkpoint(other, 2, {"trainer_state_rank0.pt": 10})
    bad = fake_checkpoint(other, 4, {"trainer_state_rank0.pt": 10, "model.pt": 20})
    (bad / "model.pt").unlink()
    with pytest.raises(
        ResumeError, match=f"the checkpoint is damaged: {bad}/model.pt is missing; resume from {good}"
    ):
        ckpt.resolve(str(bad))  # named explicitly: refused, never swapped for another
    assert ckpt.resolve(str(other.parent)) == good  # another run's directory: its newest intact one...
    assert bad.is_dir()  # ...and nothing there is renamed
    (good / "trainer_state_rank0.pt").write_bytes(b"")
    with pytest.raises(
        ResumeError, match=r"no intact checkpoint in .*: .*step_00000004/model.pt is missing \(and 1 older"
    ):
        ckpt.resolve(str(other.parent))
