"""AdamW and the learning-rate schedule: linear warmup, then linear or cosine decay (or constant)."""

from __future__ import annotations

import math

import torch

from acomp.config import OptimConfig

SCHEDULES = ("linear", "cosine", "constant")  # after warmup; see lr_factor


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, cpu_offload: bool = False
) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases, norms and the summary table.

    With ZeRO CPU offload DeepSpeed needs its own CPU Adam; otherwise torch's AdamW (fused on CUDA) avoids
    DeepSpeed's FusedAdam JIT build (which fails on CUDA images whose arch list it does not know).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = getattr(p, "ds_shape", p.shape)
        (no_decay if len(skip) < 2 or "embed_summary" in name else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    betas = (cfg.betas[0], cfg.betas[1])
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of `optim.lr` at optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """LambdaLR on the raw optimizer; DeepSpeed steps it once per optimizer step and checkpoints it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
