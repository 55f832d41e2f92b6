"""Shared helpers for the trainer tests: one tiny corpus per session, tiny run configs, launcher subprocesses.

Every run goes through the real entry point (`python launchers/train.py` or `torchrun --nproc_per_node 2`),
on CPU with DeepSpeed's CPU accelerator and gloo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from acomp.train.distributed import RANK_VARIABLES, free_port

REPO = Path(__file__).resolve().parents[2]
_built: dict[str, Path] = {}


def load_script(relpath: str, name: str | None = None):
    """A repository script (a launcher, an example, a benchmark) imported as a module, for calling its main()
    in-process. Registered in sys.modules under `name` (default: the file's stem), where dataclasses look
    their module up."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_corpus(tmp_path_factory) -> Path:
    """stdlib sources, a 512-token BPE, 128-token blocks, 80 documents (about 5 s to build, once per session)."""
    if "corpus" not in _built:
        from acomp.data import build_corpus

        out = tmp_path_factory.mktemp("train_corpus") / "corpus"
        build_corpus(
            source="stdlib",
            out=out,
            train_tokenizer_vocab=512,
            block_size=128,
            limit_docs=80,
            val_fraction=0.2,
            progress=False,
        )
        _built["corpus"] = out
    return _built["corpus"]


def tiny_config(corpus: Path, output_dir: Path, **sections) -> dict:
    """A run config dict: tiny Llama (d=64, 2 layers), 2 substeps x 2 segments of 32 tokens, ZeRO-3, fp32."""
    cfg = {
        "model": {
            "family": "llama",
            "arch": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
            },
        },
        "compression": {
            "summary_length": 4,
            "training_substeps": 2,
            "segments_per_substep": 2,
            "randomize_segments": False,
            "segment_lengths": [32, 32],
            "segment_gradient_checkpointing": True,
        },
        "data": {"path": str(corpus)},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "linear"},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 6,
            "global_batch_size": 2,
            "micro_batch_size": 2,
            "seed": 0,
            "deepspeed": str(REPO / "ds_configs" / "zero3.json"),
            "precision": "fp32",
            "checkpoint_every": 0,
            "export_final": False,
        },
        "logging": {"progress": False, "log_every": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(config: Path, overrides: list[str] = (), nproc: int = 1) -> list[str]:
    script = str(REPO / "launchers" / "train.py")
    if nproc == 1:
        return [sys.executable, script, "--config", str(config), *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        script,
        "--config",
        str(config),
        *overrides,
    ]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun would set for one rank of a one-host group at 127.0.0.1:`port`."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def train_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for key in RANK_VARIABLES:  # a rank's variables from the caller's environment would mislead the launcher
        env.pop(key, None)
    return env


def launch(config: Path, overrides: list[str] = (), nproc: int = 1, expect_rc: int = 0, timeout: int = 300):
    """Run the trainer to completion; fail with its output when the exit status is not `expect_rc`."""
    proc = subprocess.run(
        train_command(config, overrides, nproc),
        cwd=REPO,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"trainer exited {proc.returncode} (expected {expect_rc})\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir)}
