"""Training throughput of the real trainer path against a naive Hugging Face loop, side by side in one call.

What runs (docs/PERFORMANCE.md explains the numbers and the levers):
- *acomp*: random-init AutoCompressors built, wrapped and stepped exactly as `acomp.train.run` does it
  (`build_model` -> `build_engine` (DeepSpeed ZeRO-1/2/3 from ds_configs/) -> `acomp.train.loop.train_step`:
  substeps, segments, summary tokens, per-segment checkpointing, truncated BPTT, bf16, the chunked loss), on
  random token blocks instead of the data pipeline. Blocks of `--segments` x `--segment-len` tokens
  (default 3 x 2048 = 6K) with `--summary-length` (50) summary tokens, cut into substeps by `--layouts`:
  `1x3` = one substep of 3 segments (gradients through all summaries; the first two segments are
  checkpointed and recomputed), `3x1` = 3 BPTT substeps of one segment (softprompt detached between them;
  nothing to recompute).
- *naive*: the same architecture as a plain transformers `*ForCausalLM` (default attention implementation and
  SDPA settings, bf16 weights, fused torch AdamW), forward + backward + step, in two protocols (`--naive`):
  `6k`: the same blocks as one 6K sequence, without activation checkpointing, or with HF's gradient
  checkpointing when that does not fit (the row says which), the stronger loop; `baselines`: the protocol
  of ../shared/spec/baselines.md, the one its 17-27% MFU figures were measured with: sequences of
  `--segment-len` (2048) tokens, HF per-layer gradient checkpointing, the same tokens per optimizer step.
  LoRA shapes get the same peft LoRA. Runs first for each shape (before any of our SDPA settings are
  touched) and only in single-process runs.
Every row reports tokens/s (text tokens, all ranks), step time, MFU (acomp.train.metrics.FlopModel: causal
attention, summary and softprompt positions included, recompute excluded; `mfu_palm` counts attention
non-causally as spec/baselines.md does), peak GPU memory (max over ranks) and the ratio to the naive row
of the same shape (`x_naive`: the `6k` protocol, `x_naive_baselines`: the baselines.md one; and, for
ZeRO-2/3, `x_zero1`: to ZeRO-1 of the same settings). A configuration that runs out of
memory is recorded as "OOM" and the next one runs. Results go to `--out` (JSON, rewritten after every row).

GPU host (wheels carried in .whl/, see benchmarks/gpu-setup.sh); one H100, the whole matrix in ~7 minutes:

    source benchmarks/gpu-setup.sh
    python benchmarks/train_throughput.py --budget-s 420 --out $OUT/train_h100.json

Lever measurements (each `--variant` re-runs the acomp row of the first shape and ZeRO stage with changes):

    python benchmarks/train_throughput.py --shapes llama-1b --zero 1 --budget-s 420 \\
        --variant nochunk:loss_chunk=0 --variant flash:sdpa=flash --variant 3x1:layout=3x1 \\
        --variant noseg:seg_ckpt=off --variant compile:compile=on --variant mb8:mb=8 --out $OUT/levers.json

ZeRO-3 scaling on 2 x H200 (one process per GPU; each rank's tokens are summed, rank 0 reports):

    python benchmarks/train_throughput.py --shapes llama-1b --zero 3 1 --no-naive --out $OUT/h200_1.json
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --shapes llama-1b --zero 3 1 --no-naive \\
        --scaling-ref $OUT/h200_1.json --out $OUT/h200_2.json

CPU smoke test (tiny shapes, ~30 s; tests/test_bench_smoke.py runs it):

    DS_ACCELERATOR=cpu python benchmarks/train_throughput.py --smoke --out .bench/smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # Llama-1B as in spec/baselines.md (TinyLlama's shape): 1.03B non-embedding parameters, GQA 32/4.
    "llama-1b": dict(
        mb=4,
        family="llama",
        arch=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=8192,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    ),
    "opt-1.3b": dict(
        mb=4,
        family="opt",
        arch=dict(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                  num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
                  bos_token_id=2, eos_token_id=2, pad_token_id=1),
    ),
    "opt-2.7b": dict(
        mb=2,
        family="opt",
        arch=dict(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                  bos_token_id=2, eos_token_id=2, pad_token_id=1),
    ),
    # Llama-2-7B's shape with the paper's LoRA (r 16 on q/k/v/o, trained summary table).
    "llama-7b-lora": dict(
        mb=1,
        family="llama",
        lora=True,
        arch=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    ),
    # --smoke: CPU-sized.
    "tiny": dict(
        mb=2,
        family="llama",
        arch=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    ),
    "tiny-lora": dict(
        mb=2,
        family="llama",
        lora=True,
        arch=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    ),
}  # fmt: skip
LORA = {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
NAIVE_PROTOCOLS = ("6k", "baselines")
VARIANT_KEYS = ("loss_chunk", "sdpa", "seg_ckpt", "compile", "liger", "mb", "layout", "zero", "shape")


# ------------------------------------------------------------------------------------------ settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["llama-1b", "opt-1.3b", "opt-2.7b", "llama-7b-lora"],
        choices=sorted(SHAPES),
    )
    p.add_argument(
        "--zero",
        nargs="+",
        type=int,
        default=[1, 3, 2],
        choices=[0, 1, 2, 3],
        help="ZeRO stages, in this order (ds_configs/zero<N>.json)",
    )
    p.add_argument(
        "--layouts",
        nargs="+",
        default=["1x3"],
        help="substeps x segments per substep; their product is --segments",
    )
    p.add_argument("--segments", type=int, default=3, help="segments per block")
    p.add_argument("--segment-len", type=int, default=2048, help="text tokens per segment")
    p.add_argument("--summary-length", type=int, default=50)
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per rank per forward (default per shape: llama-1b/opt-1.3b 4, opt-2.7b 2, "
        "llama-7b-lora 1)",
    )
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed optimizer steps (kernel planning, allocator)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--sdpa-backend", default="auto", choices=["auto", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--loss-chunk", type=int, default=4096, help="model.loss_chunk_size (0 = unchunked)")
    p.add_argument("--segment-ckpt", default="on", choices=["on", "off"])
    p.add_argument("--compile", action="store_true", help="model.compile_layers")
    p.add_argument("--liger", action="store_true", help="model.liger_kernel (needs liger-kernel)")
    p.add_argument(
        "--ds",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a DeepSpeed JSON key (dotted, YAML value), e.g. "
        "zero_optimization.stage3_param_persistence_threshold=20480",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help=f"extra acomp row of the first shape/ZeRO stage with changes; keys: {', '.join(VARIANT_KEYS)}, "
        "ds.<dotted DeepSpeed key>",
    )
    p.add_argument("--no-naive", action="store_true", help="skip the naive baselines")
    p.add_argument(
        "--naive",
        nargs="+",
        default=list(NAIVE_PROTOCOLS),
        choices=list(NAIVE_PROTOCOLS),
        help="naive baseline protocols to run per shape: 6k = each block as one sequence, no checkpointing; "
        "baselines = spec/baselines.md's (segment-length sequences, HF gradient checkpointing)",
    )
    p.add_argument(
        "--naive-grad-ckpt",
        default="auto",
        choices=["auto", "on", "off"],
        help="HF gradient checkpointing for the 6k naive baseline: auto = only after an OOM (the baselines "
        "protocol always checkpoints)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="per-device peak; default from the GPU name"
    )
    p.add_argument(
        "--budget-s", type=float, default=0, help="start no new row after this many seconds (0 = no limit)"
    )
    p.add_argument("--scaling-ref", default=None, help="JSON of a 1-process run: adds scaling_efficiency")
    p.add_argument(
        "--sync-debug",
        action="store_true",
        help="warn at every host-device sync during one timed step of each acomp row",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, profile one more step of each acomp row (torch.profiler): writes DIR/<row>.txt "
        "(top CUDA ops, GPU busy share) and DIR/<row>.json (chrome trace)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run (DS_ACCELERATOR=cpu), < 1 minute")
    p.add_argument("--out", default=".bench/train_throughput.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes = [s for s in args.shapes if s in ("tiny", "tiny-lora")] or ["tiny", "tiny-lora"]
        args.zero = [z for z in args.zero if z in (1, 3)] or [1, 3]
        args.segment_len, args.summary_length, args.micro_batch, args.accumulation = 32, 4, 2, 1
        args.warmup, args.steps, args.loss_chunk = 1, 2, 24
        args.peak_tflops = args.peak_tflops or 0.001
    return args  # fmt: skip


def parse_variant(spec: str) -> tuple[str, dict]:
    if ":" not in spec:
        raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    name, body = spec.split(":", 1)
    changes = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS and not key.startswith("ds."):
            raise SystemExit(
                f"--variant {spec!r}: unknown key {key!r} (known: {', '.join(VARIANT_KEYS)}, ds.*)"
            )
        changes[key] = value
    return name, changes


def row_settings(args, shape: str, zero: int, layout: str) -> dict:
    """Everything that defines one acomp row (variants edit a copy)."""
    return {
        "shape": shape,
        "zero": zero,
        "layout": layout,
        "mb": micro_batch(args, shape),
        "sdpa": args.sdpa_backend,
        "loss_chunk": args.loss_chunk,
        "seg_ckpt": args.segment_ckpt == "on",
        "compile": args.compile,
        "liger": args.liger,
        "ds": dict(kv.split("=", 1) for kv in args.ds),
    }


def apply_variant(settings: dict, changes: dict) -> dict:
    import yaml

    settings = copy.deepcopy(settings)
    for key, value in changes.items():
        if key.startswith("ds."):
            settings["ds"][key[3:]] = value
        elif key in ("mb", "loss_chunk", "zero"):
            settings[key] = int(value)
        elif key in ("seg_ckpt", "compile", "liger"):
            settings[key] = value.lower() in ("1", "on", "true", "yes")
        else:
            settings[key] = yaml.safe_load(value) if key != "layout" else value
    return settings


def micro_batch(args, shape: str) -> int:
    return args.micro_batch or SHAPES[shape].get("mb", 1)


def layout_dims(layout: str, segments: int) -> tuple[int, int]:
    substeps, per = (int(x) for x in layout.lower().split("x"))
    if substeps * per != segments:
        raise SystemExit(f"layout {layout}: {substeps} x {per} != --segments {segments}")
    return substeps, per


# ------------------------------------------------------------------------------------------ helpers
class RandomBlocks:
    """Stands in for acomp.train.data.Batches: micro-batches of random token blocks, pinned on GPU hosts
    as the real loader's are."""

    def __init__(self, batch: int, length: int, vocab: int, seed: int, pin: bool, count: int = 4):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.blocks = [torch.randint(3, vocab, (batch, length), generator=g) for _ in range(count)]
        if pin:
            self.blocks = [b.pin_memory() for b in self.blocks]
        self.i = 0

    def __next__(self) -> dict:
        self.i += 1
        return {"input_ids": self.blocks[(self.i - 1) % len(self.blocks)]}

    def __iter__(self):
        return self


class _NoTokenizer:
    """What build_model needs from a tokenizer when the architecture gives every id."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def get_vocab(self) -> dict:
        return {}


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def release(*objects) -> None:
    """Drop GPU memory between rows: DeepSpeed engines first (hooks, buffers), then the allocator cache."""
    import torch

    for obj in objects:
        destroy = getattr(obj, "destroy", None)
        if callable(destroy):
            with contextlib.suppress(Exception):
                destroy()
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reduce_row(values: dict, dist) -> dict:
    """Sum tokens/FLOPs, max time/memory over ranks (one collective each)."""
    from acomp.train.distributed import all_reduce_sum

    summed = all_reduce_sum([values["tokens"], values["flops"], values["flops_palm"]], dist.device)
    timing = [values["seconds"], values["peak_gib"] or 0.0]
    if dist.world_size > 1:
        import torch
        import torch.distributed as tdist

        t = torch.tensor(timing, dtype=torch.float64, device=dist.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        timing = t.tolist()
    return {"tokens": summed[0], "flops": summed[1], "flops_palm": summed[2], "seconds": timing[0],
            "peak_gib": timing[1] if values["peak_gib"] is not None else None}  # fmt: skip


def time_steps(
    step_fn, warmup: int, steps: int, device, sync_debug: bool = False
) -> tuple[float, list[float]]:
    """Mean seconds per timed step (synchronised), and every step's time."""
    import torch

    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        debug = sync_debug and device.type == "cuda" and i == warmup
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                if debug:
                    warnings.simplefilter("default")  # each syncing line once
                step_fn(i)
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode(0)
        sync(device)
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    return sum(timed) / len(timed), times


# ------------------------------------------------------------------------------------------ rows
def run_config(args, settings: dict, dist):
    """The run config of one acomp row (the trainer's own dataclasses)."""
    from acomp.config import config_from_dict

    shape = SHAPES[settings["shape"]]
    substeps, per = layout_dims(settings["layout"], args.segments)
    mb = settings["mb"]
    raw = {
        "model": {
            "family": shape["family"],
            "arch": dict(shape["arch"]),
            "sdpa_backend": settings["sdpa"],
            "loss_chunk_size": settings["loss_chunk"],
            "compile_layers": settings["compile"],
            "liger_kernel": settings["liger"],
        },
        "compression": {
            "summary_length": args.summary_length,
            "accumulate_summary": True,
            "segment_gradient_checkpointing": settings["seg_ckpt"],
            "training_substeps": substeps,
            "segments_per_substep": per,
            "randomize_substeps": False,
            "segment_lengths": [args.segment_len] * per,
        },
        "lora": {"enabled": bool(shape.get("lora")), **LORA},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "train": {
            "micro_batch_size": mb,
            "global_batch_size": mb * args.accumulation * dist.world_size,
            "deepspeed": ds_config_path(settings),
            "precision": "auto",
            "seed": args.seed,
            "max_steps": 10**6,
        },
        "logging": {"progress": False},
    }
    return config_from_dict(raw)


def ds_config_path(settings: dict) -> str:
    """ds_configs/zero<N>.json, or a temporary copy with the --ds / variant overrides applied."""
    import yaml

    path = REPO / "ds_configs" / f"zero{settings['zero']}.json"
    if settings["zero"] == 0:
        path = Path(tempfile.mkdtemp()) / "zero0.json"
        base = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
        base["zero_optimization"] = {"stage": 0}
        path.write_text(json.dumps(base))
    if not settings["ds"]:
        return str(path)
    ds = json.loads(path.read_text())
    for key, value in settings["ds"].items():
        node = ds
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    out = Path(tempfile.mkdtemp()) / path.name
    out.write_text(json.dumps(ds))
    return str(out)


def run_acomp(args, settings: dict, dist, peak) -> dict:
    """One acomp row: build the engine as acomp.train.run does, run warmup + timed optimizer steps."""
    import torch

    from acomp.train import loop
    from acomp.train.engine import (
        base_model_config,
        build_engine,
        build_model,
        plan_batches,
        resolve_ds_config,
        unwrap,
        use_bf16,
    )
    from acomp.train.metrics import FlopModel
    from acomp.train.segments import segment_position_budget

    cfg = run_config(args, settings, dist)
    shape = SHAPES[settings["shape"]]
    vocab = shape["arch"]["vocab_size"]
    plan = plan_batches(cfg, dist.world_size)
    tokenizer = _NoTokenizer(vocab)
    hidden = base_model_config(cfg, tokenizer).hidden_size
    ds_config = resolve_ds_config(cfg, plan, dist.world_size, dist.device, hidden)
    dtype = torch.bfloat16 if use_bf16(cfg, dist.device) else torch.float32
    device_ctx = torch.device(dist.device) if dist.device.type == "cuda" else contextlib.nullcontext()
    engine = model = None
    built = time.perf_counter()
    try:
        with device_ctx:  # initialise on the GPU (a 7B fp32 init on the host takes minutes)
            model = build_model(cfg, tokenizer, ds_config, dtype)
        flops = FlopModel.of(model, cfg)
        palm = FlopModel.of(model, cfg, causal=False)
        max_segment = segment_position_budget(unwrap(model).config, cfg.compression)
        engine = build_engine(model, cfg, ds_config, dist)
        engine.train()
        setup_s = time.perf_counter() - built
        blocks = RandomBlocks(
            plan.micro_batch_size,
            args.segments * args.segment_len,
            vocab,
            args.seed + dist.rank,
            pin=dist.device.type == "cuda",
        )
        last = {}

        def step(i):
            last["out"] = loop.train_step(engine, blocks, cfg, plan, max_segment, i, dist)

        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        seconds, times = time_steps(step, args.warmup, args.steps, dist.device, args.sync_debug)
        profile = (
            profile_step(step, args.warmup + args.steps, args.profile, settings, dist) if args.profile else {}
        )
        substeps, per = layout_dims(settings["layout"], args.segments)
        segments = [[args.segment_len] * per for _ in range(substeps)]
        sequences = plan.micro_batch_size * plan.accumulation
        values = {
            "tokens": sequences * args.segments * args.segment_len,
            "flops": sequences * flops.per_sequence(segments),
            "flops_palm": sequences * palm.per_sequence(segments),
            "seconds": seconds,
            "peak_gib": peak_gib(dist.device),
        }
        loss = final_loss(last.get("out"))
        zero = ds_config.get("zero_optimization", {})
        return {
            **summarise(values, dist, peak),
            "setup_s": setup_s,
            "step_times_s": times,
            **profile,
            "loss": loss,
            "n_params_trainable": flops.n_trainable,
            "n_params_frozen": flops.n_frozen,
            "flops_per_sequence": flops.per_sequence(segments),
            "zero_config": {
                k: v for k, v in zero.items() if "bucket" in k or "persistence" in k or k == "stage"
            },
        }
    finally:
        release(engine, model)


def profile_step(step_fn, index: int, directory: str, settings: dict, dist) -> dict:
    """One more optimizer step under torch.profiler. Returns the share of the step's wall time that the GPU
    spent in kernels (low = host-bound: launches, syncs, Python) and writes the op table and a trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dist.device.type == "cuda" else [])
    sync(dist.device)
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=False) as prof:
        step_fn(index)
        sync(dist.device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type.name == "CUDA")
    if not dist.is_main:
        return {"profile_wall_s": wall, "gpu_busy_share": kernel_us / 1e6 / wall}
    name = "_".join(f"{k}-{v}" for k, v in settings.items() if k not in ("ds",) and v not in (None, {}))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sort = "self_cuda_time_total" if dist.device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=45, max_name_column_width=70)
    busy = kernel_us / 1e6 / wall
    (out / f"{name}.txt").write_text(
        f"wall {wall:.3f} s, GPU kernels {kernel_us / 1e6:.3f} s ({busy:.1%})\n{table}"
    )
    prof.export_chrome_trace(str(out / f"{name}.json"))
    return {"profile_wall_s": wall, "gpu_busy_share": busy}


def final_loss(out) -> float | None:
    """The last substep loss of a train_step result (StepOutputs, or the older (losses, segments) tuple)."""
    losses = getattr(out, "losses", None)
    if losses is None and isinstance(out, tuple):
        losses = out[0]
    try:
        return float(losses[-1][-1])
    except (TypeError, IndexError):
        return None


def summarise(values: dict, dist, peak) -> dict:
    total = reduce_row(values, dist)
    seconds = total["seconds"]
    row = {
        "status": "ok",
        "world_size": dist.world_size,
        "tokens_per_step": int(total["tokens"]),
        "step_time_s": seconds,
        "tokens_per_s": total["tokens"] / seconds,
        "tflops_per_gpu": total["flops"] / seconds / dist.world_size / 1e12,
        "mfu": None,
        "mfu_palm": None,
        "peak_mem_gib": total["peak_gib"],
    }
    if peak:
        row["mfu"] = total["flops"] / (seconds * dist.world_size * peak)
        row["mfu_palm"] = total["flops_palm"] / (seconds * dist.world_size * peak)
    return row


def run_naive(args, shape_name: str, dist, peak, grad_ckpt: bool, protocol: str = "6k") -> dict:
    """Plain transformers model, default attention, bf16 weights, torch AdamW: forward + backward + step.
    `protocol` 6k: one sequence per block; baselines: sequences of one segment's length (spec/baselines.md),
    `segments` times the micro-batches per step, so a step sees the same number of tokens."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from acomp.train.metrics import FlopModel, attention_width

    shape = SHAPES[shape_name]
    config = CONFIG_MAPPING[shape["family"]](**shape["arch"])
    # The naive run sees whole 6K sequences: OPT's learned position table (2048) must cover them.
    config.max_position_embeddings = max(config.max_position_embeddings, args.segments * args.segment_len)
    cuda = dist.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = optimizer = None
    try:
        torch.manual_seed(args.seed)
        with torch.device(dist.device) if cuda else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            if shape.get("lora"):
                from peft import LoraConfig, get_peft_model

                lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                  target_modules=LORA["target_modules"], bias="none")  # fmt: skip
                model = get_peft_model(model, lora)
        if grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
        baselines = protocol == "baselines"
        length = args.segment_len if baselines else args.segments * args.segment_len
        accumulation = args.accumulation * (args.segments if baselines else 1)
        mb = micro_batch(args, shape_name)
        blocks = RandomBlocks(mb, length, shape["arch"]["vocab_size"], args.seed, pin=cuda)
        losses = []

        def step(i):
            for _ in range(accumulation):
                ids = next(blocks)["input_ids"].to(dist.device, non_blocking=True)
                loss = model(input_ids=ids, labels=ids).loss
                (loss / accumulation).backward()
                losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats(dist.device)
        seconds, times = time_steps(step, args.warmup, args.steps, dist.device)
        naive_settings = {"shape": shape_name, "mode": "naive", "protocol": protocol, "grad_ckpt": grad_ckpt}
        profile = (
            profile_step(step, args.warmup + args.steps, args.profile, naive_settings, dist)
            if args.profile
            else {}
        )
        base = getattr(model, "get_base_model", lambda: model)()
        trainable = frozen = 0
        skip = {id(p) for p in base.get_input_embeddings().parameters()}
        skip |= {id(p) for n, p in base.named_parameters() if "embed_positions" in n}
        for p in model.parameters():
            if id(p) not in skip:
                if p.requires_grad:
                    trainable += p.numel()
                else:
                    frozen += p.numel()
        model_flops = FlopModel(trainable, frozen, config.num_hidden_layers, attention_width(config), 0, True)
        palm = FlopModel(trainable, frozen, config.num_hidden_layers, attention_width(config), 0, True, False)
        sequences = mb * accumulation
        values = {
            "tokens": sequences * length,
            "flops": sequences * model_flops.per_sequence([[length]]),
            "flops_palm": sequences * palm.per_sequence([[length]]),
            "seconds": seconds,
            "peak_gib": peak_gib(dist.device),
        }
        return {
            **summarise(values, dist, peak),
            "step_times_s": times,
            **profile,
            "loss": float(losses[-1]) if losses else None,
            "hf_grad_ckpt": grad_ckpt,
            "protocol": protocol,
            "sequence_len": length,
            "mb": mb,
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
            "sdpa_priority": sdpa_priority(),
            "n_params_trainable": trainable,
            "n_params_frozen": frozen,
        }
    finally:
        release(optimizer, model)


def sdpa_priority() -> list[str]:
    import torch
    from torch.nn.attention import SDPBackend

    names = {int(getattr(SDPBackend, n)): n for n in ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION",
                                                      "CUDNN_ATTENTION", "OVERRIDEABLE") if hasattr(SDPBackend, n)}  # fmt: skip
    return [names.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order()]


# ------------------------------------------------------------------------------------------ driver
def meta(args, dist) -> dict:
    import deepspeed
    import peft
    import torch
    import transformers

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else platform.processor() or "cpu",
        "world_size": dist.world_size,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "peft": peft.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }  # fmt: skip
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        info["git"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return info


def plan_rows(args) -> list[dict]:
    """Rows in run order: per shape the naive baseline, then ZeRO stages x layouts; then the variants."""
    rows = []
    for shape in args.shapes:
        for protocol in [] if args.no_naive else args.naive:
            name = f"{shape} naive" + ("" if protocol == "6k" else f" ({protocol}.md)")
            rows.append({"mode": "naive", "name": name, "settings": {"shape": shape, "protocol": protocol}})
        for zero in args.zero:
            for layout in args.layouts:
                settings = row_settings(args, shape, zero, layout)
                rows.append({"mode": "acomp", "name": f"{shape} zero{zero} {layout}", "settings": settings})
    for spec in args.variant:
        name, changes = parse_variant(spec)
        settings = apply_variant(row_settings(args, args.shapes[0], args.zero[0], args.layouts[0]), changes)
        label = f"{settings['shape']} zero{settings['zero']} {settings['layout']} [{name}]"
        rows.append({"mode": "acomp", "name": label, "variant": name, "settings": settings})
    return rows


def add_ratios(results: list[dict], reference: list[dict] | None) -> None:
    naive = {
        (r["settings"]["shape"], r["settings"]["protocol"]): r
        for r in results
        if r["mode"] == "naive" and r.get("status") == "ok"
    }
    zero1 = {}
    for r in results:
        s = r["settings"]
        if r["mode"] == "acomp" and r.get("status") == "ok" and s["zero"] == 1 and "variant" not in r:
            zero1[(s["shape"], s["layout"], s["mb"])] = r
    for r in results:
        if r.get("status") != "ok" or r["mode"] != "acomp":
            continue
        s = r["settings"]
        for protocol, key in (("6k", "x_naive"), ("baselines", "x_naive_baselines")):
            base = naive.get((s["shape"], protocol))
            r[key] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        ref1 = zero1.get((s["shape"], s["layout"], s["mb"]))
        r["x_zero1"] = r["tokens_per_s"] / ref1["tokens_per_s"] if ref1 else None
        if reference:
            same = [q for q in reference if q.get("status") == "ok" and q.get("world_size") == 1
                    and q["mode"] == r["mode"] and q["settings"] == s]  # fmt: skip
            if same:
                r["scaling_efficiency"] = r["tokens_per_s"] / (r["world_size"] * same[0]["tokens_per_s"])


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row_line(r: dict) -> str:
    keys = ("tokens_per_s", "mfu", "mfu_palm", "peak_mem_gib", "x_naive", "x_naive_baselines", "x_zero1",
            "wall_s", "hf_grad_ckpt")  # fmt: skip
    parts = [f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r[k]}" for k in keys if k in r]
    return f"{r['name']}: {r.get('status')} " + " ".join(parts)


def print_table(results: list[dict]) -> None:
    header = (
        f"{'row':44} {'status':8} {'tok/s':>9} {'step s':>7} {'MFU':>6} {'PaLM':>6} {'GiB':>6} {'x naive':>7} "
        f"{'x b.md':>6} {'x Z1':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        status = r.get("status", "")
        print(
            f"{r['name'][:44]:44} {status[:8]:8} {fmt(r.get('tokens_per_s'), ',.0f'):>9} "
            f"{fmt(r.get('step_time_s'), '.3f'):>7} {fmt(r.get('mfu'), '.3f'):>6} {fmt(r.get('mfu_palm'), '.3f'):>6} "
            f"{fmt(r.get('peak_mem_gib'), '.1f'):>6} {fmt(r.get('x_naive'), '.2f'):>7} "
            f"{fmt(r.get('x_naive_baselines'), '.2f'):>6} {fmt(r.get('x_zero1'), '.2f'):>6}"
        )
    sys.stdout.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import torch

    from acomp.train.distributed import broadcast_object, init_distributed
    from acomp.train.metrics import peak_flops_per_device

    started = time.perf_counter()
    dist = init_distributed()
    if dist.device.type != "cuda" and not args.smoke:
        raise SystemExit("benchmarks/train_throughput.py needs a CUDA GPU (or --smoke on CPU)")
    peak = peak_flops_per_device(args.peak_tflops, dist.device)
    reference = json.loads(Path(args.scaling_ref).read_text())["results"] if args.scaling_ref else None
    info = meta(args, dist)
    results = []
    out = Path(args.out)
    for row in plan_rows(args):
        over = bool(args.budget_s) and time.perf_counter() - started > args.budget_s
        if broadcast_object(over):  # rank 0's clock decides, so all ranks run the same rows
            results.append({**row, "status": "skipped (budget)"})
            continue
        if row["mode"] == "naive" and dist.world_size > 1:
            results.append({**row, "status": "skipped (naive baseline: single process only)"})
            continue
        t0 = time.perf_counter()
        result = dict(row)
        if dist.device.type == "cuda":  # what earlier rows left behind (should stay ~0)
            result["mem_before_gib"] = torch.cuda.memory_allocated(dist.device) / 2**30
        try:
            if row["mode"] == "naive":
                result.update(run_naive_with_fallback(args, row["settings"], dist, peak))
            else:
                result.update(run_acomp(args, row["settings"], dist, peak))
        except Exception as e:  # one failing row must not stop the matrix
            result["status"] = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:400]}"
            del e
        release()
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        add_ratios(results, reference)
        if dist.is_main:
            print(f"[{time.perf_counter() - started:4.0f}s] {row_line(result)}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"meta": info, "results": results}, indent=2, default=str))
    if dist.is_main:
        info["total_s"] = time.perf_counter() - started
        out.write_text(json.dumps({"meta": info, "results": results}, indent=2, default=str))
        print(json.dumps({k: v for k, v in info.items() if k != "settings"}))
        print_table(results)
    return 0


def run_naive_with_fallback(args, settings: dict, dist, peak) -> dict:
    """The 6k naive baseline without activation checkpointing, or with HF's when that runs out of memory;
    the baselines.md protocol always with it."""
    shape = settings["shape"]
    if settings["protocol"] == "baselines":
        return run_naive(args, shape, dist, peak, grad_ckpt=True, protocol="baselines")
    if args.naive_grad_ckpt != "auto":
        return run_naive(args, shape, dist, peak, grad_ckpt=args.naive_grad_ckpt == "on")
    try:
        return run_naive(args, shape, dist, peak, grad_ckpt=False)
    except Exception as e:
        if not is_oom(e):
            raise
        del e
    release()
    return run_naive(args, shape, dist, peak, grad_ckpt=True)


if __name__ == "__main__":
    raise SystemExit(main())
