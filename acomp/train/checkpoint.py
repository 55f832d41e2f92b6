"""Resumable checkpoints (atomic, last K kept) and the HF-format export of the trained weights.

Layout of `<output_dir>/checkpoints/`:

    latest                      text file: the tag of the newest complete checkpoint
    step_00000100/              one checkpoint (tag = step_<8 digits>)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed: model, optimizer, scheduler
        trainer_state_rank<R>.pt   per rank: step, tokens seen, data-loader state, RNG states
        config.yaml                the resolved run config
    .tmp-step_00000200/         a checkpoint being written (ignored, removed by the next save)

A checkpoint is written under `.tmp-<tag>` and renamed to `<tag>` by rank 0 only after every rank has
finished writing, then `latest` is replaced atomically, so a crash at any point leaves the previous
checkpoint complete and `latest` pointing at a complete directory. Needs a filesystem shared by all ranks.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from acomp.config import RunConfig, save_config
from acomp.train.distributed import Dist, barrier, broadcast_object

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    def __init__(self, root: str | Path, keep: int, dist: Dist):
        self.root = Path(root)
        self.keep = keep
        self.dist = dist

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

    def resolve(self, resume: str) -> Path | None:
        """`train.resume` -> the checkpoint directory to load, or None to start fresh."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if (path / "latest").is_file() or (path / "checkpoints").is_dir():  # an output or checkpoints dir
            root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            found = Checkpointer(root, self.keep, self.dist).latest()
            if found is None:
                raise FileNotFoundError(f"train.resume={resume!r}: no complete checkpoint in {root}")
            return found
        if not (path / "trainer_state_rank0.pt").is_file():
            raise FileNotFoundError(
                f"train.resume={resume!r} is not a checkpoint directory (no trainer_state)"
            )
        return path

    # ------------------------------------------------------------------------------------- saving
    def save(self, engine, step: int, trainer_state: dict, cfg: RunConfig) -> Path:
        """Write the checkpoint of `step` atomically on all ranks; returns its directory."""
        tag = tag_for(step)
        final = self.root / tag
        exists = broadcast_object(final.is_dir() if self.dist.is_main else None)
        if exists:
            return final  # this exact step is already saved (e.g. a signal right after resuming)
        tmp_tag = f".tmp-{tag}"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        tmp = self.root / tmp_tag
        torch.save(trainer_state, tmp / f"trainer_state_rank{self.dist.rank}.pt")
        if self.dist.is_main:
            save_config(cfg, tmp / "config.yaml")
        barrier()
        if self.dist.is_main:
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _write_atomic(self.root / "latest", tag)
            _fsync_dir(self.root)
            self.prune()
        barrier()
        return final

    def prune(self) -> None:
        """Delete all but the newest `keep` complete checkpoints."""
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------------------------ loading
    def load(self, engine, path: Path) -> dict:
        """Restore DeepSpeed state (model, optimizer, scheduler) and return this rank's trainer state."""
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
        own = path / f"trainer_state_rank{self.dist.rank}.pt"
        state = torch.load(own if own.is_file() else path / "trainer_state_rank0.pt", weights_only=False)
        if not own.is_file():
            state["rng"] = None  # a new rank (world size changed): keep its fresh seed
        return state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    from acomp.train.engine import unwrap

    module = engine.module
    state = consolidated_state_dict(module, dist)
    if dist.is_main:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        base = unwrap(module)
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
