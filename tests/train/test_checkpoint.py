"""Checkpoints: atomic layout and retention (fake engine, in-process), exact resume and preemption (launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from runs import (
    REPO,
    launch,
    losses,
    read_metrics,
    tiny_config,
    tiny_corpus,
    train_command,
    train_env,
    write_config,
)

from acomp.config import RunConfig
from acomp.train.checkpoint import (
    FILES_FILE,
    CheckpointDamagedError,
    Checkpointer,
    ResumeError,
    merge_lora_state_dict,
)
from acomp.train.distributed import Dist
from acomp.train.preemption import EXIT_REQUEUE

DIST = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class FakeEngine:
    """Writes one file per checkpoint like DeepSpeed does; can crash half-way through."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        if self.crash:
            with open(os.path.join(save_dir, tag, "model.pt"), "w") as f:
                f.write("partial")
            raise OSError("disk vanished mid-write")
        torch.save({"weights": torch.zeros(2)}, os.path.join(save_dir, tag, "model.pt"))

    def load_checkpoint(self, load_dir, tag):
        return os.path.join(load_dir, tag), {}


def save(ckpt: Checkpointer, step: int, engine=None):
    return ckpt.save(engine or FakeEngine(), step, {"step": step, "rng": None}, RunConfig())


def test_layout_latest_and_retention(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, dist=DIST)
    assert ckpt.resolve("auto") is None
    for step in (10, 20, 30):
        save(ckpt, step)
    names = sorted(p.name for p in ckpt.complete())
    assert names == ["step_00000020", "step_00000030"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000030"
    latest = ckpt.resolve("auto")
    assert latest.name == "step_00000030"
    assert {p.name for p in latest.iterdir()} == {
        "model.pt",
        "trainer_state_rank0.pt",
        "config.yaml",
        "files.json",
    }
    assert ckpt.load(FakeEngine(), latest)["step"] == 30
    assert ckpt.resolve(str(tmp_path)).name == "step_00000030"  # an output dir works too
    assert ckpt.resolve(str(latest / "..")).name == "step_00000030"
    with pytest.raises(ResumeError, match="no such directory"):
        ckpt.resolve(str(tmp_path / "nowhere"))


def test_a_run_that_would_mix_its_checkpoints_with_an_earlier_runs_is_refused(tmp_path):
    """`never`, another run's checkpoint or an older one of this directory, with checkpoints here that the run
    would not continue: refused by name before anything is built, nothing moved (else `latest`, retention and
    an already-saved step would pick among both runs')."""
    root = tmp_path / "run" / "checkpoints"
    ckpt = Checkpointer(root, keep=3, dist=DIST)
    assert ckpt.resolve("never") is None  # nothing here yet
    for step in (10, 20, 30):
        save(ckpt, step)
    with pytest.raises(ResumeError) as refused:
        ckpt.resolve("never")
    assert str(refused.value) == (
        f"train.resume=never, but {root} holds checkpoints of an earlier run (step_00000020, step_00000030 and "
        "1 more): this run's would mix with them; use another train.output_dir, or move them away to start over"
    )
    other = Checkpointer(tmp_path / "other" / "checkpoints", keep=3, dist=DIST)
    save(other, 5)
    with pytest.raises(
        ResumeError, match=r"^train.resume='.*step_00000005' \(another run's checkpoint\), but "
    ):
        ckpt.resolve(str(other.root / "step_00000005"))
    with pytest.raises(ResumeError) as refused:
        ckpt.resolve(str(root / "step_00000010"))
    assert str(refused.value) == (
        f"train.resume='{root / 'step_00000010'}' is older than step_00000020, step_00000030 in {root}: "
        f"continuing from it would mix the two; move the newer ones out of {root} first"
    )
    assert [p.name for p in ckpt.complete()] == ["step_00000010", "step_00000020", "step_00000030"]
    assert ckpt.resolve(str(root / "step_00000030")).name == "step_00000030"  # the newest: continued
    fresh = Checkpointer(tmp_path / "fresh" / "checkpoints", keep=3, dist=DIST)
    assert fresh.resolve(str(root / "step_00000010")) == root / "step_00000010"  # another run's, into nothing


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, dist=DIST)
    save(ckpt, 10)
    with pytest.raises(OSError, match="mid-write"):
        save(ckpt, 20, FakeEngine(crash=True))
    assert (tmp_path / "checkpoints" / ".tmp-step_00000020").is_dir()  # the torn write is left aside...
    assert ckpt.resolve("auto").name == "step_00000010"  # ...and never chosen
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099")  # a pointer to nothing: fall back
    assert ckpt.resolve("auto").name == "step_00000010"
    save(ckpt, 20)  # the next save clears the torn directory
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000020").exists()
    assert ckpt.resolve("auto").name == "step_00000020"


def test_a_damaged_checkpoint_is_named_set_aside_and_the_previous_one_used(tmp_path):
    """files.json records every file's size; a truncated or missing file, or one that fails to load, makes
    `auto` fall back to the newest intact checkpoint with a warning naming the file."""
    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, keep=3, dist=DIST)
    for step in (10, 20, 30):
        save(ckpt, step)
    listed = json.loads((root / "step_00000030" / FILES_FILE).read_text())["files"]
    assert set(listed) == {"config.yaml", "model.pt", "trainer_state_rank0.pt"}
    assert all(listed[name] == (root / "step_00000030" / name).stat().st_size for name in listed)
    (root / "step_00000030" / "model.pt").write_text("w")
    (root / "step_00000020" / "config.yaml").unlink()
    warnings = []
    assert ckpt.resolve("auto", report=warnings.append) == root / "step_00000010"
    assert warnings == [
        f"warning: checkpoint {root / 'step_00000030'} is damaged: {root / 'step_00000030' / 'model.pt'} is 1 "
        f"bytes but was written with {listed['model.pt']} (truncated); set aside as damaged-step_00000030; "
        "resuming from step_00000010 instead",
        f"warning: checkpoint {root / 'step_00000020'} is damaged: {root / 'step_00000020' / 'config.yaml'} is "
        "missing; set aside as damaged-step_00000020; resuming from step_00000010 instead",
    ]
    assert [p.name for p in ckpt.complete()] == ["step_00000010"]  # the damaged ones no longer count
    save(ckpt, 20)  # the run goes on from step 10 and writes step 20 again
    assert ckpt.resolve("auto") == root / "step_00000020"

    # A file of the right size whose bytes changed: found when it fails to load, named, the previous one used.
    state = root / "step_00000020" / "trainer_state_rank0.pt"
    state.write_bytes(b"\0" * state.stat().st_size)
    with pytest.raises(CheckpointDamagedError, match=f"{state} is corrupted") as failed:
        ckpt.load(FakeEngine(), root / "step_00000020")
    assert (
        ckpt.fall_back(failed.value.path, failed.value.problem, report=warnings.append).name
        == "step_00000010"
    )
    assert warnings[-1].endswith("set aside as damaged-step_00000020; resuming from step_00000010 instead")
    save(ckpt, 10)  # already there and intact: kept
    (root / "step_00000010" / "model.pt").write_text("")
    with pytest.raises(ResumeError, match=r"no intact checkpoint in .*step_00000010/model.pt is 0 bytes"):
        ckpt.resolve("auto")
    assert (root / "step_00000010").is_dir()  # nothing set aside when there is nothing to fall back to


def test_merge_lora_matches_peft():
    """The export's LoRA merge (on a gathered state dict) equals peft's merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig

    from acomp import LlamaAutoCompressorModel

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    config.summary_length = 3
    torch.manual_seed(0)
    indices = {"embed_tokens": [1, 5], "lm_head": [1, 5]}
    model = get_peft_model(
        LlamaAutoCompressorModel(config),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["embed_summary"],
            trainable_token_indices=indices,
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name or "trainable_tokens" in name:
                p.add_(torch.randn_like(p))
    merged = merge_lora_state_dict(model.state_dict(), scaling=8 / 4, token_indices=indices)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], msg=key)


# ------------------------------------------------------------------------------------- through the launcher
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


def constant_lr_config(corpus, out, **train):
    # A constant schedule does not depend on max_steps, so a run stopped early by a signal and resumed with
    # another max_steps follows the same trajectory as the straight run.
    return tiny_config(
        corpus, out, optim={"schedule": "constant", "warmup_steps": 0}, train={"checkpoint_every": 4, **train}
    )


SAMPLED_LENGTHS = {
    "compression_mode": "variable", "compression_max_len": 4, "training_presence": "sampled", "compression_lambda": 30.0
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "attention_dropout, compression",
    [(0.0, {}), (0.1, {}), (0.0, SAMPLED_LENGTHS)],
    ids=["deterministic", "attention-dropout", "sampled-lengths"],
)
def test_resume_is_exact(corpus, tmp_path, attention_dropout, compression):
    """8 steps straight == 4 steps, stop, resume from the step-4 checkpoint, 4 more (fp32: bitwise); with
    attention dropout or sampled summary lengths too, whose draws come from the checkpointed random state (the
    data loader must not draw from it when a resumed run starts its iterator)."""
    straight = tmp_path / "straight"
    run = constant_lr_config(corpus, straight, max_steps=8)
    run["model"]["arch"] = {**run["model"]["arch"], "attention_dropout": attention_dropout}
    run["compression"] = {**run.get("compression", {}), **compression}
    config = write_config(tmp_path / "a.yaml", run)
    launch(config)
    assert (straight / "checkpoints" / "latest").read_text() == "step_00000008"

    resumed = tmp_path / "resumed"
    launch(
        config,
        [f"train.output_dir={resumed}", f"train.resume={straight / 'checkpoints' / 'step_00000004'}"],
    )
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert b[step] == a[step], (step, a, b)


@pytest.mark.slow
def test_signal_checkpoints_exits_75_and_auto_resumes(corpus, tmp_path):
    """SIGUSR1 mid-run -> checkpoint after the current step, exit 75 (the SLURM templates' requeue status, asked
    for with train.preempt_exit_code; the default 0 is tests/faults/test_fault_signals.py's); rerun with
    resume=auto continues."""
    straight = tmp_path / "straight"
    config = write_config(tmp_path / "a.yaml", constant_lr_config(corpus, straight, max_steps=12))
    launch(config)

    out = tmp_path / "preempted"
    overrides = [f"train.output_dir={out}", "train.max_steps=100000", "train.checkpoint_every=0"]
    overrides.append(f"train.preempt_exit_code={EXIT_REQUEUE}")
    proc = subprocess.Popen(
        train_command(config, overrides),
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, output.decode()[-4000:]
    stopped = max(r["step"] for r in read_metrics(out))
    assert stopped < 12, "the run finished before the signal; the test needs slower steps"
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"

    launch(config, [f"train.output_dir={out}", "train.max_steps=12", "train.resume=auto"])
    a, b = losses(straight), losses(out)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))  # each step logged once
    for step in range(1, 13):
        assert b[step] == a[step], (step, stopped, a, b)
