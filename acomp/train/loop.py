"""The training loop. `run(cfg)` reads top to bottom: set-up, resume, then for every optimizer step

    batch of blocks -> substeps (BPTT windows) -> segments -> model(substep, softprompt) -> engine.backward
    -> softprompt.detach() into the next substep -> ... -> engine.step() (the update) -> log -> checkpoint

DeepSpeed counts every substep as one micro-step: `engine.step()` after each backward is a no-op until the
last substep of the last micro-batch, where it clips, updates and advances the schedule.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from acomp.config import RunConfig, save_config
from acomp.train.checkpoint import Checkpointer, export_hf, rng_state, set_rng_state
from acomp.train.data import Batches, check_corpus_fits, ensure_corpus, open_corpus, train_loader, val_dataset
from acomp.train.distributed import Dist, all_reduce_mean, init_distributed
from acomp.train.engine import (
    BatchPlan,
    base_model_config,
    build_engine,
    build_model,
    flop_params,
    plan_batches,
    resolve_ds_config,
    unwrap,
    use_bf16,
)
from acomp.train.evaluate import evaluate_summary_ppl
from acomp.train.metrics import (
    MetricsLog,
    memory_gib,
    peak_flops_per_device,
    segment_flops,
    sequence_positions,
)
from acomp.train.preemption import PreemptionHandler
from acomp.train.segments import Substep, segment_generator, segment_position_budget, split_substeps


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1 after saving a checkpoint; run it again to resume."""

    def __init__(self, checkpoint: Path, signal_name: str):
        super().__init__(f"stopped by {signal_name}; checkpoint saved at {checkpoint}")
        self.checkpoint = checkpoint


def run(cfg: RunConfig) -> Path:
    """Train an AutoCompressor as `cfg` says; returns the output directory (raises Preempted on a signal)."""
    dist = init_distributed(cfg.train.dist_timeout_s)
    out = Path(cfg.train.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.train.seed)

    # Model, data and engine.
    ensure_corpus(cfg, dist.is_main)
    corpus = open_corpus(cfg.data.path)
    plan = plan_batches(cfg, dist.world_size)
    hidden = base_model_config(cfg, corpus.tokenizer).hidden_size
    ds_config = resolve_ds_config(cfg, plan, dist.world_size, dist.device, hidden)
    dtype = torch.bfloat16 if use_bf16(cfg, dist.device) else torch.float32
    model = build_model(cfg, corpus.tokenizer, ds_config, dtype, corpus_vocab=corpus.vocab_size)
    model_config = unwrap(model).config
    check_corpus_fits(corpus, model_config)
    max_segment = segment_position_budget(model_config, cfg.compression)
    flops = FlopModel.of(model, cfg)
    engine = build_engine(model, cfg, ds_config, dist)
    batches = Batches(train_loader(cfg, corpus, plan.micro_batch_size))

    # Resume.
    checkpoints = Checkpointer(out / "checkpoints", cfg.train.keep_checkpoints, dist)
    step, tokens_seen = 0, 0
    resume_from = checkpoints.resolve(cfg.train.resume)
    seed_everything(cfg.train.seed + dist.rank)  # per-rank randomness (dropout) from here on
    if resume_from is not None:
        state = checkpoints.load(engine, resume_from)
        step, tokens_seen = state["step"], state["tokens_seen"]
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])

    log = MetricsLog(out, cfg, dist.is_main, step, cfg.train.max_steps)
    if resume_from is not None:
        log.write(f"resumed from {resume_from} at step {step}")
    preemption = PreemptionHandler(dist.device)
    peak = peak_flops_per_device(cfg.train.peak_tflops, dist.device)
    saved_step = step if resume_from is not None else -1
    engine.train()
    try:
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            lr = engine.get_lr()[0]
            losses, segments = train_step(engine, batches, cfg, plan, max_segment, step, dist)
            step += 1
            seconds = time.perf_counter() - started

            record = step_record(step, losses, segments, lr, engine, cfg, plan, dist, flops, seconds, peak)
            tokens_seen += record["tokens"]
            record["tokens_seen"] = tokens_seen
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
                record.update(evaluate(engine, cfg, corpus, max_segment))
            log.log(record)

            stop = preemption.requested()
            if stop or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                path = checkpoints.save(engine, step, trainer_state(step, tokens_seen, batches), cfg)
                saved_step = step
                if stop:
                    log.write(f"{preemption.name}: checkpoint at step {step} in {path}; exiting for requeue")
                    raise Preempted(path, preemption.name)

        if saved_step != step:
            checkpoints.save(engine, step, trainer_state(step, tokens_seen, batches), cfg)
        if cfg.train.export_final:
            final = export_hf(engine, cfg, out / "final", dist, corpus.tokenizer_dir)
            log.write(f"exported HF weights to {final}")
    finally:
        preemption.restore()
        log.close()
    return out


def train_step(
    engine, batches: Batches, cfg: RunConfig, plan: BatchPlan, max_segment: int, step: int, dist: Dist
) -> tuple[list[list[torch.Tensor]], list[list[list[int]]]]:
    """One optimizer step on this rank: per micro-batch, the substeps in order with the softprompt carried
    (detached) from one to the next. Returns the losses [micro][substep] and segment lengths used."""
    losses, segments = [], []
    for micro in range(plan.accumulation):
        input_ids = next(batches)["input_ids"]
        rng = segment_generator(cfg.train.seed, step, micro, dist.rank)
        substeps = split_substeps(input_ids, cfg.compression, max_segment, rng)
        softprompt, micro_losses = None, []
        for i, substep in enumerate(substeps):
            carry = i < len(substeps) - 1  # the last substep's summaries would go unused
            loss, softprompt = train_substep(engine, substep, softprompt, carry)
            micro_losses.append(loss)
        losses.append(micro_losses)
        segments.append([s.segment_lengths for s in substeps])
    return losses, segments


def train_substep(engine, substep: Substep, softprompt: torch.Tensor | None, carry: bool):
    """Forward + backward of one BPTT window; returns its loss and the softprompt for the next window.

    Gradients flow through the summaries of this window's segments (one model call); the returned
    softprompt is detached (truncated BPTT), so later windows send no gradient back into this one.
    """
    input_ids = substep.input_ids.to(engine.device)
    out = engine(
        input_ids,
        labels=input_ids,
        segment_lengths=substep.segment_lengths,
        softprompt=softprompt,
        output_softprompt=carry,
        return_logits=False,
    )
    engine.backward(out.loss)  # DeepSpeed divides by its accumulation count (micro-batches x substeps)
    engine.step()  # the optimizer update happens only at the accumulation boundary
    return out.loss.detach(), truncate_bptt(out.softprompt) if carry else None


def truncate_bptt(softprompt: torch.Tensor) -> torch.Tensor:
    """The softprompt as the next substep sees it: same values, no gradient path back."""
    return softprompt.detach()


@dataclass
class FlopModel:
    """What MFU needs to know about the model (see acomp.train.metrics)."""

    n_params: int
    n_layers: int
    hidden: int
    summary_length: int
    accumulate: bool

    @classmethod
    def of(cls, model, cfg: RunConfig) -> FlopModel:
        config = unwrap(model).config
        return cls(
            n_params=flop_params(model),
            n_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            summary_length=cfg.compression.summary_length,
            accumulate=cfg.compression.accumulate_summary,
        )

    def per_sequence(self, segment_lengths: list[list[int]]) -> float:
        positions = sequence_positions(segment_lengths, self.summary_length, self.accumulate)
        return sum(segment_flops(self.n_params, self.n_layers, self.hidden, t) for t in positions)


def step_record(step, losses, segments, lr, engine, cfg, plan, dist, flops, seconds, peak) -> dict:
    """The metrics of one optimizer step, averaged over ranks (one collective)."""
    per_substep = torch.stack([torch.stack(m) for m in losses]).float().mean(dim=0).tolist()
    micro = plan.micro_batch_size
    tokens = sum(sum(sum(sub) for sub in seq) for seq in segments) * micro
    step_flops = sum(flops.per_sequence(seq) for seq in segments) * micro
    reduced = all_reduce_mean([*per_substep, tokens, step_flops], dist.device)
    per_substep, tokens, step_flops = reduced[: len(per_substep)], reduced[-2], reduced[-1]
    world_tokens, world_flops = tokens * dist.world_size, step_flops * dist.world_size
    grad_norm = engine.get_global_grad_norm()
    record = {
        "step": step,
        "loss": sum(per_substep) / len(per_substep),
        **{f"loss_substep_{i}": v for i, v in enumerate(per_substep)},
        "lr": float(lr),
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens": int(world_tokens),
        "tokens_per_s": world_tokens / seconds,
        "step_time_s": seconds,
        "mfu": None if peak is None else world_flops / (seconds * dist.world_size * peak),
        "summary_length": cfg.compression.summary_length,
        "segments_per_sequence": sum(len(sub) for sub in segments[0]),
        "memory_gib": memory_gib(dist.device),
    }
    return record


def evaluate(engine, cfg: RunConfig, corpus, max_segment: int) -> dict:
    """Held-out perplexity of the last segment, no context vs summary vectors (see acomp.train.evaluate)."""
    lengths = eval_segment_lengths(cfg, corpus.block_size, max_segment)
    result = evaluate_summary_ppl(
        engine.module,
        val_dataset(cfg, corpus),
        lengths,
        max_blocks=cfg.train.eval_blocks,
        device=engine.device,
    )
    engine.train()
    return {
        "eval_no_context_ppl": result["no_context_ppl"],
        "eval_summary_ppl": result["summary_ppl"],
    }


def eval_segment_lengths(cfg: RunConfig, block_size: int, max_segment: int) -> list[int]:
    """The segments of one training sequence: fixed ones repeated per substep, else equal cuts."""
    c = cfg.compression
    if not c.randomize_substeps:
        return list(c.segment_lengths) * c.training_substeps
    n = c.training_substeps * c.segments_per_substep
    length = min(block_size // n, max_segment)
    return [length] * n


def trainer_state(step: int, tokens_seen: int, batches: Batches) -> dict:
    return {"step": step, "tokens_seen": tokens_seen, "data": batches.state_dict(), "rng": rng_state()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
