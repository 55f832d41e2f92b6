"""The training loop. `run(cfg)` reads top to bottom: set-up, resume, then for every optimizer step

    batch of blocks -> substeps (BPTT windows) -> segments -> model(substep, softprompt) -> engine.backward
    -> softprompt.detach() into the next substep -> ... -> engine.step() (the update) -> log -> checkpoint

Every backward of a step runs inside DeepSpeed's `coalesce_grad_reduction()` (`train.coalesce_grad_reduction`,
on by default where it applies: `grad_reduction_plan`): gradients stay on the weights and are reduced once when
the block ends. DeepSpeed counts every substep as one micro-step, so `engine.step()` runs once per backward
after the block (each a no-op but the last, which clips, updates and advances the schedule); without
coalescing it runs after each backward.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acomp.config import ConfigError, RunConfig, save_config
from acomp.modeling.softprompt import Softprompt
from acomp.train import faults
from acomp.train.badsteps import BadStepGuard
from acomp.train.checkpoint import (
    CheckpointDamagedError,
    Checkpointer,
    export_hf,
    rng_state,
    set_rng_state,
)
from acomp.train.checkpointing import CheckpointingProbe, checkpointing_plan, positions_per_call
from acomp.train.data import (
    Batches,
    Corpus,
    DataError,
    check_corpus_fits,
    ensure_corpus,
    open_corpus,
    train_loader,
    val_dataset,
)
from acomp.train.distributed import Dist, all_reduce_mean, broadcast_object, init_distributed
from acomp.train.engine import (
    BatchPlan,
    base_model_config,
    build_engine,
    build_model,
    compile_decoder_layers,
    compile_length_plan,
    compiles_layers,
    fix_loss_chunks,
    grad_reduction_plan,
    plan_batches,
    resolve_ds_config,
    unwrap,
    use_bf16,
    zero3_module_stack_restored,
)
from acomp.train.heldout import heldout_ppl
from acomp.train.metrics import (
    FlopModel,
    MetricsLog,
    memory_gib,
    peak_flops_per_device,
)
from acomp.train.preemption import PreemptionHandler
from acomp.train.preflight import (
    changed_settings,
    check_corpus,
    check_corpus_unchanged,
    check_model_source,
    check_resume_config,
    check_resumed_corpus,
    check_segments,
    check_tokenizer,
    corpus_identity,
    model_source_error,
    position_budget,
)
from acomp.train.runlock import output_dir_lock
from acomp.train.segments import Substep, segment_generator, split_substeps


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGUSR1/SIGINT after saving a checkpoint; run it again to resume."""

    def __init__(self, checkpoint: Path, signal_name: str):
        super().__init__(f"stopped by {signal_name}; checkpoint saved at {checkpoint}")
        self.checkpoint, self.signal_name = checkpoint, signal_name


@dataclass
class Trainer:
    """Everything a run trains with, as `build` made it: the one set-up that launchers/train.py and the
    benchmarks share."""

    cfg: RunConfig
    dist: Dist
    corpus: Corpus
    plan: BatchPlan
    engine: Any  # the DeepSpeed engine around the (peft-wrapped) AutoCompressor
    batches: Batches
    max_segment: int  # longest segment the model's positions allow (segment_position_budget)
    flops: FlopModel
    peak_flops: float | None  # per device, for MFU
    coalesce: bool = False  # one gradient reduction per step (grad_reduction_plan)
    # compression.segment_gradient_checkpointing: auto on a GPU, until its second step has decided it
    checkpointing_probe: CheckpointingProbe | None = None
    val_data: Any = None  # the held-out split, opened at the first evaluation and kept for the next ones


def build(cfg: RunConfig, dist: Dist) -> Trainer:
    """Corpus, checks, model, DeepSpeed engine and training batches, in the order they must happen: bad input
    fails first, naming the thing, before anything is built."""
    check_model_source(cfg)
    ensure_corpus(cfg, dist.is_main)
    corpus = open_corpus(cfg.data.path, cfg.data.cache_dir)
    check_corpus(cfg, corpus)
    try:
        base_config = base_model_config(cfg, corpus.tokenizer)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # transformers: no such directory or hub model, unreadable config
        raise model_source_error(cfg.model.name_or_path, e) from None
    check_tokenizer(cfg, corpus, base_config.vocab_size)
    max_segment = position_budget(cfg, base_config)
    check_segments(cfg, corpus.block_size, max_segment)
    plan = plan_batches(cfg, dist.world_size)
    ds_config = resolve_ds_config(cfg, plan, dist.world_size, dist.device, base_config.hidden_size)
    coalesce, notice = grad_reduction_plan(cfg, ds_config)
    if notice and dist.is_main:
        print(notice, flush=True)
    dtype = torch.bfloat16 if use_bf16(cfg, dist.device) else torch.float32
    model = build_model(cfg, corpus.tokenizer, ds_config, dtype, corpus.vocab_size, dist.device)
    fix_loss_chunks(model, cfg, ds_config, corpus.block_size, max_segment)
    if compiles_layers(cfg, dist.device):
        length, notice = compile_length_plan(cfg, model)
        if notice and dist.is_main:
            print(notice, flush=True)
        compile_decoder_layers(model, length)
    check_corpus_fits(corpus, unwrap(model).config)
    flops = FlopModel.of(model, cfg)
    engine = build_engine(model, cfg, ds_config, dist)
    batches = Batches(train_loader(cfg, corpus, plan.micro_batch_size))
    peak = peak_flops_per_device(cfg.train.peak_tflops, dist.device)
    probe, notice = checkpointing_plan(cfg, unwrap(model).config, dist.device)
    if notice and dist.is_main:
        print(notice, flush=True)
    return Trainer(cfg, dist, corpus, plan, engine, batches, max_segment, flops, peak, coalesce, probe)


# Collective timeout during set-up: ranks reach their first collectives after uneven one-off work.
SETUP_TIMEOUT_S = 600


def run(cfg: RunConfig) -> Path:
    """Train an AutoCompressor as `cfg` says; returns the output directory (raises Preempted on a signal).

    Set-up (rendezvous, model and data loading, one-off builds) runs under a collective timeout of at least
    SETUP_TIMEOUT_S; the training steps under `train.dist_timeout_s`."""
    dist = init_distributed(max(cfg.train.dist_timeout_s, SETUP_TIMEOUT_S))
    out = Path(cfg.train.output_dir)
    with output_dir_lock(out, dist):  # one run per output directory (OutputDirBusyError)
        return _run(cfg, dist, out)


def _run(cfg: RunConfig, dist: Dist, out: Path) -> Path:
    # What to resume, and whether it fits this config: decided before anything is built.
    checkpoints = Checkpointer(out / "checkpoints", cfg.train.keep_checkpoints, dist)
    resume_from = checkpoints.resolve(cfg.train.resume, report=say)
    if resume_from is not None:
        check_resume_config(cfg, resume_from)
    seed_everything(cfg.train.seed)
    trainer = build(cfg, dist)
    engine, batches, corpus = trainer.engine, trainer.batches, trainer.corpus
    started_on = corpus_identity(corpus)  # checked again before export
    checkpoints.corpus = started_on
    if resume_from is not None:
        check_resumed_corpus(resume_from, corpus)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")  # only now: a refused run leaves the directory as it was
    faults.install(engine.module, dist.rank)  # fault injection for tests/faults/; no-op unless asked for

    # Resume.
    step, tokens_seen = 0, 0
    seed_everything(cfg.train.seed + dist.rank)  # per-rank randomness (dropout) from here on
    if resume_from is not None:
        resume_from, state = restore(trainer, checkpoints, resume_from)
        step, tokens_seen = state["step"], state["tokens_seen"]
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])

    log = MetricsLog(out, cfg, dist.is_main, step, cfg.train.max_steps)
    if resume_from is not None:
        log.write(f"resumed from {resume_from} at step {step}")
        changes = changed_settings(cfg, resume_from, RESUME_APPLIED_KEYS)
        if changes:
            log.write(f"changed since that checkpoint, applied from step {step + 1} on: {', '.join(changes)}")
        if step >= cfg.train.max_steps:
            log.write(f"the run is finished (train.max_steps={cfg.train.max_steps}): nothing to train")
    preemption = PreemptionHandler(dist.device)
    guard = BadStepGuard(cfg.train.max_bad_steps, engine, checkpoints.latest)
    checkpoint_due = False  # a periodic checkpoint falling on a skipped step waits for the next good one
    saved_step = step if resume_from is not None else -1
    set_collective_timeout(cfg.train.dist_timeout_s)
    engine.train()
    try:
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            lr = engine.get_lr()[0]
            faults.begin_step(step + 1)
            outputs = train_step(trainer, step)
            step += 1
            seconds = time.perf_counter() - started
            if outputs.notice:
                log.write(outputs.notice)

            record = step_record(trainer, step, outputs, lr, seconds)
            tokens_seen += record["tokens"]
            record["tokens_seen"] = tokens_seen
            record.update(guard.check(step, record["loss"]))  # a non-finite loss: the update was skipped
            if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
                record.update(heldout_eval(trainer))
            log.log(record)
            guard.stop_if_exhausted()  # train.max_bad_steps in a row: stop, the last good checkpoint intact

            stop = preemption.requested()
            every = cfg.train.checkpoint_every
            checkpoint_due |= bool(every) and step % max(every, 1) == 0
            if stop or (checkpoint_due and not record["skipped"]):
                path = checkpoints.save(engine, step, trainer_state(step, tokens_seen, batches), cfg)
                saved_step, checkpoint_due = step, False
                if stop:
                    log.write(f"{preemption.name}: checkpoint at step {step} in {path}; stopping")
                    raise Preempted(path, preemption.name)

        if saved_step != step:
            checkpoints.save(engine, step, trainer_state(step, tokens_seen, batches), cfg)
        if cfg.train.export_final:
            check_corpus_before_export(trainer, started_on, checkpoints)
            final = export_hf(engine, cfg, out / "final", dist, corpus.tokenizer_dir)
            adapter = (final / "adapter_config.json").is_file()  # what export_hf wrote (rank 0 logs)
            log.write(f"exported {'the LoRA adapter' if adapter else 'HF weights'} to {final}")
    finally:
        preemption.restore()
        log.close()
    return out


def say(line: str) -> None:
    print(line, flush=True)


def set_collective_timeout(seconds: int) -> None:
    """From here on a collective that waits longer than `seconds` for another rank fails (a hung rank).

    A torch without distributed.set_timeout (the GPU image's 2.11) keeps the set-up timeout instead."""
    import datetime

    import torch.distributed as tdist

    if tdist.is_initialized() and hasattr(tdist, "set_timeout"):
        tdist.set_timeout(datetime.timedelta(seconds=seconds))


# Settings a resumed run takes from its config rather than from the checkpoint (the optimizer and schedule
# keep their own copies of them): a change is applied from the resumed step on, and logged.
RESUME_APPLIED_KEYS = (
    "optim.lr",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "optim.grad_clip",
    "train.max_steps",
)
# What the optimizer's param groups carry besides the parameters and the scheduled lr.
OPTIMIZER_GROUP_KEYS = ("betas", "eps", "weight_decay", "initial_lr")


def restore(trainer: Trainer, checkpoints: Checkpointer, path: Path) -> tuple[Path, dict]:
    """Load checkpoint `path` into the engine and return (the checkpoint loaded, this rank's trainer state).

    The optimizer and schedule settings stay those of this run's config (RESUME_APPLIED_KEYS): a checkpoint
    restores its own lr, betas, eps, weight decay and base lr with the optimizer's state, so they are put back
    from the freshly built optimizer and the lr recomputed for the resumed step, exactly as an uninterrupted
    run with this config computes it. With one rank and `train.resume=auto`, a checkpoint whose file fails to
    load is set aside and the next older intact one loaded (DeepSpeed then restores every part again)."""
    engine, cfg = trainer.engine, trainer.cfg
    scheduler = engine.lr_scheduler
    fresh = [{k: g[k] for k in OPTIMIZER_GROUP_KEYS if k in g} for g in scheduler.optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    while True:
        try:
            state = checkpoints.load(engine, path)
            break
        except CheckpointDamagedError as e:
            if trainer.dist.world_size > 1 or cfg.train.resume != "auto":
                raise
            path = checkpoints.fall_back(e.path, e.problem, report=say)
            check_resume_config(cfg, path)
            check_resumed_corpus(path, trainer.corpus)
    groups = scheduler.optimizer.param_groups  # new dicts: load_state_dict replaced them
    for group, settings in zip(groups, fresh):
        group.update(settings)
    scheduler.base_lrs = base_lrs
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return path, state


def check_corpus_before_export(trainer: Trainer, started_on: dict, checkpoints: Checkpointer) -> None:
    """Refuse to export when data.path no longer holds the corpus the run started on: `final/` would pair
    the new corpus' tokenizer with weights trained on the old ids. Rank 0 checks; every rank gets the
    verdict (export_hf is collective)."""
    problem = None
    if trainer.dist.is_main:
        try:
            check_corpus_unchanged(trainer.corpus, started_on)
        except DataError as e:
            problem = (
                f"{e}; not exporting {Path(trainer.cfg.train.output_dir) / 'final'}: its tokenizer would not "
                f"be the one the weights were trained with. The checkpoints are kept (newest: "
                f"{checkpoints.latest()}): put the run's corpus back at data.path and run the same command "
                f"again to export"
            )
    problem = broadcast_object(problem)
    if problem is not None:
        raise DataError(problem)


def train_step(trainer: Trainer, step: int) -> StepOutputs:
    """One optimizer step on this rank: per micro-batch, the substeps in order with the softprompt carried
    detached from one to the next."""
    cfg, engine, batches, dist = trainer.cfg, trainer.engine, trainer.batches, trainer.dist
    outputs = StepOutputs()
    penalty_scale = length_penalty_scale(cfg.compression.lambda_warmup_steps, step + 1)
    # The step's data first, outside the coalescing block, whose exit runs collectives even when an error
    # passes through: a data error on one rank then ends that rank at once. One asynchronous copy per
    # micro-batch (pinned by the loader on GPU hosts): copying each substep from pageable memory would make the
    # host wait for the previous substep's backward every time.
    micro_batches = []
    for micro in range(trainer.plan.accumulation):
        input_ids = next(batches)["input_ids"].to(engine.device, non_blocking=True)
        rng = segment_generator(cfg.train.seed, step, micro, dist.rank)
        micro_batches.append(split_substeps(input_ids, cfg.compression, trainer.max_segment, rng))
    coalesce, probe = trainer.coalesce, trainer.checkpointing_probe
    if probe is not None and not probe.measures():
        probe = None
    with engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
        for substeps in micro_batches:
            softprompt, micro_losses = None, []
            calls = (
                positions_per_call([s.segment_lengths for s in substeps], trainer.flops) if probe else None
            )
            for i, substep in enumerate(substeps):
                carry = i < len(substeps) - 1  # the last substep's summaries would go unused
                if probe is not None:
                    probe.start(calls[i])
                result = train_substep(
                    engine,
                    substep,
                    softprompt,
                    carry,
                    penalty_scale,
                    not coalesce,
                    probe and probe.forward_done,
                )
                softprompt = result.softprompt
                micro_losses.append(result.loss)
                if result.summary_lengths is not None:
                    outputs.summary_lengths.append(result.summary_lengths.flatten())
            outputs.losses.append(micro_losses)
            outputs.segments.append([s.segment_lengths for s in substeps])
    if coalesce:  # DeepSpeed's micro-step count, once per backward; the last one updates
        for _ in range(sum(len(losses) for losses in outputs.losses)):
            engine.step()
    if probe is not None:
        trainer.checkpointing_probe = None
        decision = probe.decide()
        unwrap(engine).config.segment_gradient_checkpointing = not decision.off
        outputs.notice = decision.line(step + 1)
    return outputs


@dataclass
class StepOutputs:
    """What one optimizer step reports: losses [micro][substep], segment lengths [micro][substep][segment],
    and (variable-length mode) the summary length of every compressing segment, E[L] in training."""

    losses: list[list[torch.Tensor]] = field(default_factory=list)
    segments: list[list[list[int]]] = field(default_factory=list)
    summary_lengths: list[torch.Tensor] = field(default_factory=list)
    notice: str | None = None  # a line for the log (segment checkpointing's `auto` decision)


@dataclass
class SubstepOutput:
    loss: torch.Tensor  # detached
    softprompt: Softprompt | None  # detached: the next window's summary vectors (None when not carried)
    summary_lengths: torch.Tensor | None  # [B, compressing segments], detached (variable mode)


def length_penalty_scale(warmup_steps: int, step: int) -> float:
    """The share of compression_lambda that optimizer step `step` (1-based) applies: `warmup_steps` ramp it
    linearly up to 1 (compression.lambda_warmup_steps)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def train_substep(
    engine,
    substep: Substep,
    softprompt: Softprompt | None,
    carry: bool,
    penalty_scale: float = 1.0,
    step_engine: bool = True,
    forward_done: Callable[[], None] | None = None,
) -> SubstepOutput:
    """Forward + backward of one BPTT window; returns its loss and what the next window needs.

    Gradients flow through the summaries of this window's segments (one model call); the returned softprompt
    (summary vectors and, in the variable-length mode, their presence bias) is detached (truncated BPTT), so
    later windows send no gradient back into this one. The variable mode's length penalty counts
    `penalty_scale` times (its warmup). `step_engine=False` leaves DeepSpeed's micro-step to the caller
    (inside `coalesce_grad_reduction`, where `engine.step()` may not run). `forward_done` runs between the
    forward and the backward (acomp.train.checkpointing measures there).
    """
    input_ids = substep.input_ids.to(engine.device)
    with zero3_module_stack_restored():  # the recompute's early stop leaves a module on it
        out = engine(
            input_ids,
            labels=input_ids,
            segment_lengths=substep.segment_lengths,
            softprompt=softprompt,
            output_softprompt=carry,
            return_logits=False,
        )
        loss, penalty = out.loss, getattr(out, "length_penalty", None)
        if penalty is not None and penalty_scale != 1.0:
            loss = out.lm_loss + penalty_scale * penalty
        if forward_done is not None:
            forward_done()
        engine.backward(loss)  # DeepSpeed divides by its accumulation count (micro-batches x substeps)
    if step_engine:
        engine.step()  # the optimizer update happens only at the accumulation boundary
    lengths = getattr(out, "summary_lengths", None)
    return SubstepOutput(
        loss=loss.detach(),
        softprompt=truncate_bptt(out.summary) if carry else None,
        summary_lengths=None if lengths is None else lengths.detach(),
    )


def truncate_bptt(softprompt: Softprompt | None) -> Softprompt | None:
    """The softprompt as the next substep sees it: same values, no gradient path back (None when the
    model does not compress: summary_length 0, e.g. plain causal-LM pretraining)."""
    return None if softprompt is None else softprompt.detach()


def step_record(trainer: Trainer, step: int, outputs: StepOutputs, lr: float, seconds: float) -> dict:
    """The metrics of one optimizer step, averaged over ranks (one collective)."""
    cfg, dist, peak = trainer.cfg, trainer.dist, trainer.peak_flops
    losses, segments = outputs.losses, outputs.segments
    per_substep = torch.stack([torch.stack(m) for m in losses]).float().mean(dim=0).tolist()
    micro = trainer.plan.micro_batch_size
    tokens = sum(sum(sum(sub) for sub in seq) for seq in segments) * micro
    step_flops = sum(trainer.flops.per_sequence(seq) for seq in segments) * micro
    lengths = summary_length_stats(outputs.summary_lengths, cfg.compression.compression_max_len)
    reduced = all_reduce_mean([*per_substep, tokens, step_flops, *lengths], dist.device)
    n = len(per_substep)
    per_substep, tokens, step_flops = reduced[:n], reduced[n], reduced[n + 1]
    world_tokens, world_flops = tokens * dist.world_size, step_flops * dist.world_size
    grad_norm = trainer.engine.get_global_grad_norm()
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
    if lengths:
        # Mean over ranks of each rank's mean and bin shares: exact for equal segment counts per rank.
        record["summary_length"] = reduced[n + 2]
        record["summary_length_hist"] = reduced[n + 3 :]
        c = cfg.compression
        record["compression_lambda"] = c.compression_lambda * length_penalty_scale(
            c.lambda_warmup_steps, step
        )
    return record


def summary_length_stats(lengths: list[torch.Tensor], max_len: int) -> list[float]:
    """[mean, share with round(L) = 0, 1, ..., max_len] of the compressing segments' summary lengths
    (E[L] in training), or [] in the fixed mode. One host sync per step, at logging."""
    if not lengths:
        return []
    values = torch.cat(lengths).float()
    bins = torch.bincount(values.round().long().clamp(0, max_len), minlength=max_len + 1).float()
    return [values.mean().item(), *(bins / values.numel()).tolist()]


def heldout_eval(trainer: Trainer) -> dict:
    """Held-out perplexity of the last segment, no context vs summary vectors (see acomp.train.heldout)."""
    cfg, engine, corpus = trainer.cfg, trainer.engine, trainer.corpus
    lengths = eval_segment_lengths(cfg, corpus.block_size, trainer.max_segment)
    if trainer.val_data is None:  # one dataset per run: each holds shared memory until the process exits
        trainer.val_data = val_dataset(cfg, corpus)
    result = heldout_ppl(
        engine.module,
        trainer.val_data,
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
    if not c.randomize_segments:
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
