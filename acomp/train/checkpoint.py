"""Resumable checkpoints (atomic, last K kept) and the HF-format export of the trained weights.

Layout of `<output_dir>/checkpoints/`:

    latest                      text file: the tag of the newest complete checkpoint
    step_00000100/              one checkpoint (tag = step_<8 digits>)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed: model, optimizer, scheduler
        trainer_state_rank<R>.pt   per rank: step, tokens seen, data-loader state, RNG states
        config.yaml                the resolved run config
        corpus.json                which corpus it was trained on (acomp.data.manifest.corpus_identity)
        files.json                 every other file of the checkpoint with its size, written last
    .tmp-step_00000200/         a checkpoint being written (ignored, removed by the next save)
    .trash-step_00000050/       an old checkpoint being deleted (ignored, removed by the next save)
    damaged-step_00000300/      a checkpoint found damaged when resuming, set aside (ignored, kept to inspect)

A checkpoint is written under `.tmp-<tag>` and renamed to `<tag>` by rank 0 only after every rank has
finished writing, then `latest` is replaced atomically; old checkpoints are renamed away before they are
deleted. So a crash at any point leaves every `step_*` directory complete and `latest` pointing at one, and
a failed write (disk full, quota) raises CheckpointWriteError with the previous checkpoint untouched.
Damage after the fact (a truncated copy, a deleted file) is found by comparing the files with files.json
before resuming, and resume=auto falls back to the newest intact checkpoint, naming the bad file.
Needs a filesystem shared by all ranks.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from acomp.config import ConfigError, RunConfig, save_config
from acomp.data.workdir import free_space
from acomp.train import faults
from acomp.train.distributed import Dist, barrier, broadcast_object, is_comm_error

TAG_RE = re.compile(r"^step_(\d{8})$")
CORPUS_FILE = "corpus.json"
FILES_FILE = "files.json"
DAMAGED_PREFIX = "damaged-"


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, I/O error); the previous checkpoint is intact."""


class ResumeError(ConfigError):
    """The checkpoint to resume from cannot be used (no checkpoint there, damaged, or another model's); the
    message names it and, where there is one, the checkpoint to use instead. Raised before any step."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, dist: Dist, corpus: dict | None = None):
        self.root = Path(root)
        self.keep = keep
        self.dist = dist
        self.corpus = corpus  # written into every checkpoint as corpus.json (see acomp.train.preflight)

    # ------------------------------------------------------------------------------------ finding
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
        return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / "trainer_state_rank0.pt").is_file():
                return candidate
        done = [p for p in self.complete() if (p / "trainer_state_rank0.pt").is_file()]
        return done[-1] if done else None

    def resolve(self, resume: str, report=print) -> Path | None:
        """`train.resume` -> the checkpoint directory to load, or None to start fresh (raises ResumeError).

        `auto` and an output or checkpoints directory give the newest intact checkpoint there: each newer
        damaged one is reported through `report`, naming its bad file (and, in this run's own directory,
        renamed to `damaged-<tag>` so that it is neither chosen nor counted again). A checkpoint directory
        given by name must be intact itself. A run continues its own directory's newest checkpoint or writes
        into a directory without checkpoints: anything else would mix two runs' checkpoints (ResumeError).
        Decided on rank 0 and broadcast, so all ranks load the same one.
        """
        problem, found = None, None
        if self.dist.is_main:
            try:
                found = self._resolve(resume, report)
                self._check_nothing_to_mix(resume, found)
            except ResumeError as e:
                problem = str(e)
        problem, found = broadcast_object((problem, found))
        if problem is not None:
            raise ResumeError(problem)
        return found

    def _resolve(self, resume: str, report) -> Path | None:
        if resume == "never":
            return None
        if resume == "auto":
            return self._newest_intact(self.root, resume, report, own=True)
        path = Path(resume)
        if not path.is_dir():
            raise ResumeError(f"train.resume={resume!r}: no such directory")
        if (path / "latest").is_file() or (path / "checkpoints").is_dir():  # an output or checkpoints dir
            root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            found = self._newest_intact(root, resume, report, own=root.resolve() == self.root.resolve())
            if found is None:
                raise ResumeError(f"train.resume={resume!r}: no complete checkpoint in {root}")
            return found
        if not (path / "trainer_state_rank0.pt").is_file() and not (path / FILES_FILE).is_file():
            raise ResumeError(
                f"train.resume={resume!r} is not a checkpoint directory (no trainer_state_rank0.pt; give a "
                f"checkpoints/step_* directory, a run's output_dir, or auto)"
            )
        problem = damage(path)
        if problem is not None:
            older = [
                p for p in Checkpointer(path.parent, self.keep, self.dist).complete() if p.name < path.name
            ]
            instead = next((p for p in reversed(older) if damage(p) is None), None)
            hint = f"; resume from {instead} instead (train.resume={instead})" if instead else ""
            raise ResumeError(f"train.resume={resume!r}: the checkpoint is damaged: {problem}{hint}")
        return path

    def _check_nothing_to_mix(self, resume: str, found: Path | None) -> None:
        """This directory's checkpoints that the run would not continue from (`never`, another run's
        checkpoint, an older one of its own) would stay beside the new ones: `latest` and retention would
        pick among both runs', and a step saved by both would keep the old one. Refused by name."""
        stale = self.complete()
        own = found is not None and found.parent.resolve() == self.root.resolve()
        if own:
            stale = [p for p in stale if p.name > found.name]
        if not stale:
            return
        names = ", ".join(p.name for p in stale[-2:]) + (
            f" and {len(stale) - 2} more" if len(stale) > 2 else ""
        )
        if own:
            raise ResumeError(
                f"train.resume={resume!r} is older than {names} in {self.root}: continuing from it would mix "
                f"the two; move the newer ones out of {self.root} first"
            )
        what = "never" if resume == "never" else f"{resume!r} (another run's checkpoint)"
        raise ResumeError(
            f"train.resume={what}, but {self.root} holds checkpoints of an earlier run ({names}): this run's "
            f"would mix with them; use another train.output_dir, or move them away to start over"
        )

    def _newest_intact(self, root: Path, resume: str, report, own: bool) -> Path | None:
        candidates = Checkpointer(root, self.keep, self.dist).complete()
        damaged, found = [], None
        for path in reversed(candidates):
            problem = damage(path)
            if problem is None:
                found = path
                break
            damaged.append((path, problem))
        if damaged and found is None:
            raise ResumeError(
                f"train.resume={resume}: no intact checkpoint in {root}: {damaged[0][1]}"
                + (f" (and {len(damaged) - 1} older damaged)" if len(damaged) > 1 else "")
                + "; restore one, or start over in another train.output_dir"
            )
        for bad, problem in damaged:
            self._report_damaged(bad, problem, found, report, own)
        return found

    def fall_back(self, bad: Path, problem: str, report=print) -> Path:
        """`bad` (in this run's directory) failed to load: set it aside and return the newest intact
        checkpoint older than it; ResumeError (nothing set aside) when there is none."""
        older = [p for p in self.complete() if p.name < bad.name]
        found = next((p for p in reversed(older) if damage(p) is None), None)
        if found is None:
            raise ResumeError(
                f"checkpoint {bad} is damaged: {problem}; no older checkpoint is intact: restore one, or start "
                f"over in another train.output_dir"
            )
        self._report_damaged(bad, problem, found, report, own=True)
        for skipped in [p for p in older if p.name > found.name]:  # damaged too (by their sizes)
            self._report_damaged(skipped, damage(skipped), found, report, own=True)
        return found

    def _report_damaged(self, bad: Path, problem: str, using: Path, report, own: bool) -> None:
        moved = ""
        if own:  # out of the step_* namespace: neither chosen nor counted by prune() again
            aside = bad.with_name(DAMAGED_PREFIX + bad.name)
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(bad, aside)
            moved = f"; set aside as {aside.name}"
        report(f"warning: checkpoint {bad} is damaged: {problem}{moved}; resuming from {using.name} instead")

    # ------------------------------------------------------------------------------------- saving
    def save(self, engine, step: int, trainer_state: dict, cfg: RunConfig) -> Path:
        """Write the checkpoint of `step` atomically on all ranks; returns its directory."""
        tag = tag_for(step)
        final = self.root / tag
        exists = broadcast_object(final.is_dir() and damage(final) is None if self.dist.is_main else None)
        if exists:
            return final  # this exact step is already saved (e.g. a signal right after resuming)
        tmp_tag = f".tmp-{tag}"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if final.is_dir():  # a damaged copy of this step (resume=PATH skipped it): replaced below
                os.rename(final, self.root / f".trash-{tag}")
            for stale in [*self.root.glob(".tmp-step_*"), *self.root.glob(".trash-step_*")]:
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        tmp = self.root / tmp_tag
        try:
            engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
            faults.checkpoint_pause()
            torch.save(trainer_state, tmp / f"trainer_state_rank{self.dist.rank}.pt")
            if self.dist.is_main:
                save_config(cfg, tmp / "config.yaml")
                if self.corpus is not None:
                    (tmp / CORPUS_FILE).write_text(json.dumps(self.corpus, indent=1) + "\n")
        except (OSError, RuntimeError) as e:
            # torch.save reports a failed write as a bare RuntimeError ("unexpected pos ..."); a lost rank in
            # DeepSpeed's barriers is not a write failure and goes up unchanged. Other ranks, if any, fail at
            # their next collective once this process exits.
            if isinstance(e, RuntimeError) and is_comm_error(e):
                raise
            raise self._write_failed(tag, e) from e
        barrier()
        if self.dist.is_main:
            try:
                _write_file_list(tmp)  # every rank's files are there now: their sizes, for damage()
                _fsync_tree(tmp)  # the data reaches the disk before the rename makes it "complete"
                os.rename(tmp, final)
                _write_atomic(self.root / "latest", tag)
                _fsync_dir(self.root)
                self.prune()
            except OSError as e:
                raise self._write_failed(tag, e) from e
        barrier()
        return final

    def _write_failed(self, tag: str, error: Exception) -> CheckpointWriteError:
        previous = self.latest()
        kept = (
            f"the newest complete checkpoint {previous} is intact: free space and rerun to resume from it"
            if previous is not None
            else "there is no earlier checkpoint"
        )
        return CheckpointWriteError(
            f"could not write checkpoint {tag} under {self.root} (rank {self.dist.rank}): {error} "
            f"({free_space(self.root)}; disk full, quota or I/O error?); {kept}"
        )

    def prune(self) -> None:
        """Delete all but the newest `keep` complete checkpoints. Each is renamed out of the `step_*` namespace
        first, so a crash in the middle of a deletion never leaves a partial `step_*` directory behind."""
        for old in self.complete()[: -self.keep]:
            trash = old.with_name(f".trash-{old.name}")
            os.rename(old, trash)
            shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def corpus_of(path: Path) -> dict | None:
        """The corpus identity a checkpoint was trained on (None for checkpoints written before it existed)."""
        file = Path(path) / CORPUS_FILE
        return json.loads(file.read_text()) if file.is_file() else None

    # ------------------------------------------------------------------------------------ loading
    def load(self, engine, path: Path) -> dict:
        """Restore DeepSpeed state (model, optimizer, scheduler) and return this rank's trainer state.

        A file that cannot be read despite the right size (bytes changed in place) raises
        CheckpointDamagedError naming it; a checkpoint of another model shape raises ResumeError."""
        try:
            loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
            if loaded is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint to load in {path}")
            own = path / f"trainer_state_rank{self.dist.rank}.pt"
            state = torch.load(own if own.is_file() else path / "trainer_state_rank0.pt", weights_only=False)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
            if is_comm_error(e):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            bad = unreadable_file(path)
            if bad is not None:
                raise CheckpointDamagedError(path, f"{bad} is corrupted ({first})") from None
            raise ResumeError(
                f"cannot load checkpoint {path} into this model ({type(e).__name__}: {first[:300]}); was it "
                f"written by a run of another model or world size? Start a new run in another train.output_dir"
            ) from None
        if not own.is_file():
            state["rng"] = None  # a new rank (world size changed): keep its fresh seed
        return state


class CheckpointDamagedError(ResumeError):
    """A checkpoint file failed to load (its bytes changed although its size did not)."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} is damaged: {problem}")
        self.path, self.problem = path, problem


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be used, naming the file, or None when every file listed in its
    files.json is there with the size it was written with (a cheap check: sizes, no hashing). A checkpoint
    written before files.json existed only needs its trainer state."""
    listing = Path(path) / FILES_FILE
    if not listing.is_file():
        state = Path(path) / "trainer_state_rank0.pt"
        return None if state.is_file() else f"{state} is missing"
    try:
        files = json.loads(listing.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{listing} is unreadable ({type(e).__name__}: {e})"
    for name, size in files.items():
        file = Path(path) / name
        try:
            found = file.stat().st_size
        except OSError:
            return f"{file} is missing"
        if found != size:
            how = "truncated" if found < size else "overwritten"
            return f"{file} is {found} bytes but was written with {size} ({how})"
    return None


def unreadable_file(path: Path) -> Path | None:
    """The first file of a checkpoint whose zip records fail their CRC32 (torch.save writes zip archives;
    torch.load checks no checksums, so it may load changed bytes without a word), or None."""
    import zipfile

    for file in sorted(Path(path).rglob("*.pt")):
        try:
            with zipfile.ZipFile(file) as archive:
                if archive.testzip() is not None:
                    return file
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError):
            return file
    return None


def _write_file_list(root: Path) -> None:
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    (root / FILES_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then the directories: a power loss after the rename cannot leave a
    `step_*` directory whose files were still only in the page cache."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [*sorted(p for p in root.rglob("*") if p.is_dir()), root]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- export
def consolidated_state_dict(module: torch.nn.Module, dist: Dist) -> dict | None:
    """The full state dict on rank 0 (None elsewhere), gathering ZeRO-3 partitions one module at a time so
    no rank ever holds more than one module's full parameters on the accelerator."""
    import deepspeed

    state = {}
    for prefix, sub in module.named_modules():
        params = list(sub.named_parameters(recurse=False))
        partitioned = [p for _, p in params if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
            if dist.is_main:
                for name, p in params:
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
        if dist.is_main:
            for name, b in sub.named_buffers(recurse=False):
                if name not in sub._non_persistent_buffers_set:
                    state[f"{prefix}.{name}" if prefix else name] = b.detach().cpu().clone()
    return state if dist.is_main else None


def merge_lora_state_dict(state: dict, scaling: float, token_indices: dict | None = None) -> dict:
    """A peft LoRA model's state dict -> the plain model's: W += scaling * B @ A merged in, each
    `modules_to_save` copy (the trained one) put back under the original module's name, and trainable
    token rows (peft's trainable_token_indices: {module name: ids}) written into their embedding rows."""
    prefix = "base_model.model."

    def plain(name: str) -> str:
        name = name[len(prefix) :] if name.startswith(prefix) else name
        if ".modules_to_save." in name:
            head, tail = name.split(".modules_to_save.", 1)
            name = f"{head}.{tail.split('.', 1)[1]}"
        return name.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")

    skip = (".lora_A.", ".lora_B.", ".original_module.", ".trainable_tokens_delta.")
    merged = {plain(k): v for k, v in state.items() if not any(s in k for s in skip)}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        module, rest = key.split(".lora_A.", 1)
        adapter = rest.split(".", 1)[0]
        b = state[f"{module}.lora_B.{adapter}.weight"]
        name = f"{plain(module)}.weight"
        delta = (b.float() @ a.float()) * scaling
        merged[name] = (merged[name].float() + delta).to(merged[name].dtype)
    for key, rows in state.items():
        if ".trainable_tokens_delta." not in key:
            continue
        module = key.split(".token_adapter.", 1)[0]
        ids = (token_indices or {}).get(module.rsplit(".", 1)[-1])
        if ids is None:
            raise KeyError(f"no token indices for {key}")
        name = f"{plain(module)}.weight"
        index = torch.as_tensor(ids, dtype=torch.long)
        merged[name] = merged[name].index_copy(0, index, rows.to(merged[name].dtype))
    return merged


def export_hf(engine, cfg: RunConfig, out_dir: Path, dist: Dist, tokenizer_dir: Path | None = None) -> Path:
    """Write `out_dir` in HF format (AutoCompressorModel.from_pretrained loads it), from any ZeRO stage.

    With LoRA: merged into the weights when train.export_merge_lora (default), else the peft adapter
    (+ the trained summary table) is written, to load with peft on top of the base model.
    """
    from acomp.train.checkpointing import configured
    from acomp.train.engine import unwrap

    module = engine.module
    state = consolidated_state_dict(module, dist)
    if dist.is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        base = unwrap(module)
        base.config.sdpa_backend = cfg.model.sdpa_backend  # as configured, not as resolved for training
        base.config.segment_gradient_checkpointing = configured(cfg)  # not as `auto` decided on this GPU
        is_peft = hasattr(module, "get_base_model")
        if is_peft and cfg.train.export_merge_lora:
            indices = module.peft_config[module.active_adapter].trainable_token_indices
            state = merge_lora_state_dict(state, cfg.lora.alpha / cfg.lora.r, indices)
            base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        elif is_peft:
            module.save_pretrained(tmp, state_dict=state)
        else:
            base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)
        save_config(cfg, tmp / "acomp_config.yaml")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    barrier()
    return out_dir
