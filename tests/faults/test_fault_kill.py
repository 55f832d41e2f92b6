"""SIGKILL anywhere, including inside a checkpoint write: the newest complete checkpoint loads, training
resumes and reproduces the uninterrupted run bitwise; a half-written checkpoint is never picked."""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import time

import pytest
import torch
from fault_helpers import (
    REFERENCE_STEPS,
    assert_checkpoints_complete,
    finish,
    latest,
    metric_steps,
    records,
    reference_config,
    start,
    wait_until,
)
from runs import launch, losses, write_config

from acomp.config import RunConfig
from acomp.train import faults
from acomp.train.checkpoint import Checkpointer
from acomp.train.distributed import Dist

DIST = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# --------------------------------------------------------------------- every crash point of a save, in-process
class Died(BaseException):
    """The process died here (BaseException: no `except Exception` in the code under test catches it)."""


class Crash:
    """Counts filesystem mutations and dies at the k-th one (k = 0: never)."""

    def __init__(self, at: int):
        self.at, self.count = at, 0

    def tick(self) -> None:
        self.count += 1
        if self.count == self.at:
            raise Died(self.count)

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            self.tick()
            return fn(*args, **kwargs)

        return wrapped


class Engine:
    """Writes two files the way DeepSpeed does, each in two chunks (a kill can land between them)."""

    def __init__(self, crash: Crash):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        for name in ("model_states.pt", "optim_states.pt"):
            with open(os.path.join(save_dir, tag, name), "w") as f:
                f.write("half-")
                f.flush()
                self.crash.tick()
                f.write("complete")

    def load_checkpoint(self, load_dir, tag):
        return os.path.join(load_dir, tag), {}


def assert_complete(path):
    assert {p.name for p in path.iterdir()} >= {
        "model_states.pt",
        "optim_states.pt",
        "trainer_state_rank0.pt",
    }
    for name in ("model_states.pt", "optim_states.pt"):
        assert (path / name).read_text() == "half-complete", f"{path / name} is half-written"
    assert torch.load(path / "trainer_state_rank0.pt", weights_only=False)["step"] == int(path.name[5:])


def test_a_crash_at_any_point_of_a_save_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """Kill the save of step 6 at each of its filesystem operations in turn (after checkpoints 2 and 4, keeping
    2): whatever the point, `resume=auto` picks a complete checkpoint no older than step 4, and the next save
    cleans up and succeeds."""
    k, outcomes = 0, []
    while True:
        k += 1
        root = tmp_path / f"crash{k}" / "checkpoints"
        crash = Crash(at=0)
        ckpt = Checkpointer(root, keep=2, dist=DIST, corpus={"tokenizer_sha256": "x"})
        for step in (2, 4):
            ckpt.save(Engine(crash), step, {"step": step, "rng": None}, RunConfig())
        crash.at, crash.count = k, 0
        with monkeypatch.context() as m:
            targets = (
                (os, "rename"),
                (os, "replace"),
                (shutil, "rmtree"),
                (torch, "save"),
                (pathlib.Path, "write_text"),
            )
            for module, name in targets:
                m.setattr(module, name, crash.wrap(getattr(module, name)))
            try:
                ckpt.save(Engine(crash), 6, {"step": 6, "rng": None}, RunConfig())
                died = False
            except Died:
                died = True
        chosen = Checkpointer(root, keep=2, dist=DIST).resolve("auto")
        assert chosen is not None and chosen.name in ("step_00000004", "step_00000006"), (k, chosen)
        for complete in Checkpointer(root, keep=2, dist=DIST).complete():
            assert_complete(complete)  # every step_* directory, not only the chosen one
        outcomes.append(chosen.name)
        if not died:
            break
        ckpt.save(Engine(Crash(0)), 8, {"step": 8, "rng": None}, RunConfig())
        assert Checkpointer(root, keep=2, dist=DIST).resolve("auto").name == "step_00000008"
        assert not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert k - 1 >= 9, f"only {k - 1} crash points: is the wrapping still effective?"
    assert outcomes[0] == "step_00000004" and outcomes[-1] == "step_00000006"


# ------------------------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_sigkill_at_random_points_resumes_exactly(corpus, reference, tmp_path):
    """Run 1 is SIGKILLed at a random moment after a random number of steps; run 2 resumes and is SIGKILLed
    inside its first checkpoint write; run 3 resumes and finishes. Per-step losses equal the reference run's."""
    seed = int(os.environ.get("ACOMP_FAULT_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out))
    context = f"(ACOMP_FAULT_SEED={seed})"

    # Steps paused 0.2 s: the tiny steps (~0.06 s) would let a slow poll miss run 1's end.
    ranks = start(config, [], tmp_path / "logs1", env={faults.STEP_SLEEP: "0.2"})
    after = rng.randint(1, REFERENCE_STEPS - 4)  # leaves run 2 a checkpoint to write
    wait_until(lambda: metric_steps(out) >= after, ranks, 240, f"step {after} {context}")
    time.sleep(rng.uniform(0, 0.3))  # anywhere in the next steps, checkpoint writes included
    ranks[0].proc.kill()
    finish(ranks, 30)
    first = Checkpointer(out / "checkpoints", 2, DIST).resolve("auto")
    assert_checkpoints_complete(out)

    ranks = start(config, [], tmp_path / "logs2", env={faults.CHECKPOINT_SLEEP: "120"})
    wait_until(lambda: "pausing" in ranks[0].output(), ranks, 240, f"a checkpoint write {context}")
    ranks[0].proc.kill()
    finish(ranks, 30)
    torn = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-step_")]
    assert len(torn) == 1 and not (torn[0] / "trainer_state_rank0.pt").exists(), context
    second = Checkpointer(out / "checkpoints", 2, DIST).resolve("auto")
    assert second == first, context  # the torn write changed nothing: the same complete checkpoint is chosen
    assert latest(out) == (None if first is None else first.name), context
    assert_checkpoints_complete(out)

    proc = launch(config)
    if first is not None:
        assert f"resumed from {first} at step {int(first.name[5:])}" in proc.stdout, context
    assert [r["step"] for r in records(out)] == list(range(1, REFERENCE_STEPS + 1)), context
    assert losses(out) == reference, context
