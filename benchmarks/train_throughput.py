"""Training throughput of the shipped recipes, through the trainer's own set-up and step.

Each row takes a config of `configs/` (or the quality benchmark's), swaps its pretrained model for a
random-init model of the same shape (no hub here), points it at a corpus of random tokens built by
`acomp.data.build_corpus` with the recipe's block size, and runs `acomp.train.loop.build` and `train_step`:
the code `launchers/train.py` runs, with the config's own settings. Per row it reports tokens/s and MFU as
the trainer's metrics.jsonl would (`step_record`), over the first `--first-steps` steps (compilation and any
per-shape warm-up included) and as the median of the steps after them (steady state), and peak GPU memory.

Each recipe row runs twice in the same call: with the recipe's random segment boundaries, and with fixed
boundaries of the same total length (`random/fixed` in the table). `--set KEY=VALUE` changes every row (a
lever study is not a shipped setting: its rows say so); `--variant NAME[@RECIPE]:KEY=VALUE,...` adds rows.

GPU host (wheels carried in .whl/; benchmarks/gpu-setup.sh):

    source benchmarks/gpu-setup.sh
    python benchmarks/train_throughput.py --rows llama-1b-z1 llama-1b-z3 --out $OUT/train.json
    python benchmarks/train_throughput.py --rows opt-2.7b-30k --steps 8 --first-steps 3 --out $OUT/30k.json

Several GPUs of one host (one process per GPU; each row's global batch is multiplied by the GPU count, so
every GPU does the work it does alone and tokens/s / (GPUs x one GPU's tokens/s) is the scaling efficiency):

    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --rows llama-1b-z1 llama-1b-z3 --boundaries random

There a row that fails on any rank ends the call (exit 1; the report keeps the rows before it): the other ranks
would wait in its collectives. On one process a failing row is recorded and the next one runs.

`--cold-compile` runs each row in its own process with empty compile caches: then every row's first-steps
figure includes its whole compilation, as a user's first run would (otherwise a row reuses the graphs and
kernels earlier rows of the call compiled, and only the first row's first steps are a cold start).

CPU smoke test (tiny shapes, about a minute; tests/benchmarks/test_bench_smoke.py runs it, on 1 and 2 ranks):

    DS_ACCELERATOR=cpu python benchmarks/train_throughput.py --smoke --out .bench/smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
OPT_2_7B = dict(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                max_position_embeddings=2048, word_embed_proj_dim=2560, bos_token_id=2, eos_token_id=2,
                pad_token_id=1)  # fmt: skip
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)  # fmt: skip


@dataclass
class Row:
    """A shipped recipe with a random-init model of its shape; `overrides` are dotted config keys."""

    config: str  # configs/*.yaml, or quality:pretrain / quality:finetune (benchmarks/quality.py's configs)
    family: str
    arch: dict
    overrides: list[str] = field(default_factory=list)
    block_size: int = 6144  # the recipe's corpus blocks


ROWS = {
    # The Llama recipe (configs/llama2-7b-6k.yaml: 2 x 2 random segments of 6K blocks, 50 accumulated summary
    # tokens, segment checkpointing) on a Llama-1B shape, fully trained, micro-batch 4.
    "llama-1b-z1": Row("configs/llama2-7b-6k.yaml", "llama", LLAMA_1B,
                       ["lora.enabled=false", "train.deepspeed=ds_configs/zero1.json",
                        "train.micro_batch_size=4", "train.global_batch_size=8"]),
    "llama-1b-z3": Row("configs/llama2-7b-6k.yaml", "llama", LLAMA_1B,
                       ["lora.enabled=false", "train.deepspeed=ds_configs/zero3.json",
                        "train.micro_batch_size=4", "train.global_batch_size=8"]),
    # The recipes as shipped; global batches cut to what one GPU steps through in seconds (tokens/s and MFU
    # do not depend on the accumulation count beyond the optimizer step's share).
    "llama-7b-lora": Row("configs/llama2-7b-6k.yaml", "llama", LLAMA_7B, ["train.global_batch_size=4"]),
    "opt-2.7b-6k": Row("configs/opt-2.7b-6k.yaml", "opt", OPT_2_7B, ["train.global_batch_size=4"]),
    "opt-2.7b-30k": Row("configs/opt-2.7b-30k.yaml", "opt", OPT_2_7B, ["train.global_batch_size=2"], 30720),
    # benchmarks/quality.py's 115M model: plain causal-LM pretraining vs AutoCompressor fine-tuning.
    "quality-lm": Row("quality:pretrain", "llama", {}),
    "quality-ac": Row("quality:finetune", "llama", {}),
    # --smoke
    "tiny": Row("configs/llama2-7b-6k.yaml", "llama", TINY,
                ["lora.enabled=false", "train.deepspeed=ds_configs/zero1.json", "train.micro_batch_size=2",
                 "train.global_batch_size=2", "compression.summary_length=4", "train.precision=fp32"], 512),
    "tiny-lora-z3": Row("configs/llama2-7b-6k.yaml", "llama", TINY,
                        ["train.deepspeed=ds_configs/zero3.json", "train.micro_batch_size=2",
                         "train.global_batch_size=2", "compression.summary_length=4", "train.precision=fp32"], 512),
}  # fmt: skip
RECIPE_ROWS = ["llama-1b-z1", "llama-1b-z3", "llama-7b-lora", "opt-2.7b-6k"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rows",
        nargs="+",
        default=RECIPE_ROWS,
        help=f"recipes to run, each NAME or NAME:random / NAME:fixed (one boundary mode); NAME in {sorted(ROWS)}",
    )
    p.add_argument(
        "--boundaries",
        nargs="+",
        default=["random", "fixed"],
        choices=["random", "fixed"],
        help="random: the recipe's segment boundaries; fixed: equal segments of the same total length",
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    p.add_argument(
        "--first-steps",
        type=int,
        default=10,
        help="the 'first steps' figure covers steps 1..N (warm-up included)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every row"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[@RECIPE]:KEY=VALUE[,KEY=VALUE]",
        help="extra rows of RECIPE (default: the first --rows recipe) with these config overrides",
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the run")
    p.add_argument("--corpus-dir", default=None, help="where the random-token corpora are built (reused)")
    p.add_argument("--budget-s", type=float, default=0, help="start no new row after this many seconds")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the timed steps, N more under torch.profiler (the top ops by device time and by host time, and "
        "the device's busy share of the wall time), then N more under cProfile (the Python functions with the most "
        "time): <out stem>.<row>.profile.txt beside --out, not in the timings",
    )
    p.add_argument(
        "--cold-compile",
        action="store_true",
        help="run each row in its own process with empty compile caches (inductor, triton), so that every row's "
        "first steps include its whole compilation; without it, a row finds what earlier rows of the call compiled",
    )
    p.add_argument("--row-index", type=int, default=None, help=argparse.SUPPRESS)  # --cold-compile's child
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (DS_ACCELERATOR=cpu)")
    p.add_argument("--out", default=".bench/train_throughput.json")
    args = p.parse_args(argv)
    for spec in args.rows:
        name, _, only = spec.partition(":")
        if name not in ROWS or only not in ("", "random", "fixed"):
            p.error(f"--rows {spec!r}: expected NAME[:random|:fixed] with NAME in {sorted(ROWS)}")
    for spec in args.variant:
        recipe = spec.partition(":")[0].partition("@")[2]
        if recipe and recipe not in ROWS:
            p.error(f"--variant {spec!r}: unknown recipe {recipe!r}; expected one of {sorted(ROWS)}")
    # checked here, not by acomp.cli's argparse types: importing acomp imports torch before --env is applied
    for flag, value, least in [
        ("--steps", args.steps, 1),
        ("--first-steps", args.first_steps, 1),
        ("--profile-steps", args.profile_steps, 0),
        ("--budget-s", args.budget_s, 0),
    ]:
        if value < least:
            p.error(f"{flag} {value}: expected >= {least}")
    if args.smoke:
        args.rows = [r for r in args.rows if r.startswith("tiny")] or ["tiny", "tiny-lora-z3"]
        args.steps, args.first_steps = 3, 1
        args.set = ["compression.segment_multiple=1", *args.set]
    return args


def refuse_bad_overrides(args) -> None:
    """Exit 2 naming the first row whose `--set` / `--variant` overrides its config refuses, before any corpus
    or model is built (after `--env` is applied: reading a config imports torch, which reads some of it)."""
    for row in plan_rows(args):
        try:
            recipe_config(row["row"], [*args.set, *row["extra"]])
        except ValueError as e:  # acomp.config.ConfigError names the bad key or value
            print(f"train_throughput.py: error: row {row['name']!r}: {e}", file=sys.stderr)
            raise SystemExit(2) from None


# --------------------------------------------------------------------------------------------- corpora
def random_corpus(root: Path, vocab_size: int, block_size: int, blocks: int) -> Path:
    """A corpus of random token blocks built by `build_corpus` (the real build and manifest): documents of
    `block_size` words over a word-level vocabulary whose size, with the two control tokens, is the model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from acomp.data import build_corpus

    out = root / f"random-v{vocab_size}-b{block_size}-n{blocks}"
    if (out / "manifest.json").is_file():
        return out
    words = [f"w{i}" for i in range(vocab_size - 5)]  # + <unk> <s> </s> and the 2 control tokens
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok_dir = root / f"wordlevel-{vocab_size}"
    tok.save_pretrained(tok_dir)
    import numpy as np

    rng = np.random.default_rng(0)
    docs = root / f"docs-{vocab_size}-{block_size}-{blocks}.jsonl"
    with docs.open("w") as f:
        for _ in range(blocks):
            ids = rng.integers(0, len(words), block_size)
            f.write(json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n")
    build_corpus(
        str(docs), out, tokenizer=str(tok_dir), block_size=block_size, val_fraction=0.0, progress=False
    )
    return out


# ------------------------------------------------------------------------------------------------ rows
def recipe_config(name: str, overrides: list[str]):
    """The recipe's config with `overrides` (a ConfigError names a bad one), its model swapped for a random-init
    one of its shape; and the recipe's block size and vocabulary size. Builds nothing."""
    from acomp.config import load_config

    row = ROWS[name]
    overrides = [*row.overrides, *overrides]
    if row.config.startswith("quality:"):
        sys.path.insert(0, str(REPO / "benchmarks"))
        import quality

        plan = quality.QualitySettings()
        stage = row.config.split(":")[1]
        cfg = (quality.pretrain_config if stage == "pretrain" else quality.finetune_config)(plan)
        cfg.model.name_or_path = None
        cfg.model.arch = {**plan.arch, "max_position_embeddings": plan.window, "vocab_size": plan.vocab}
        block, vocab = plan.block_size, plan.vocab
        from acomp.config import config_from_dict, parse_override, set_dotted

        raw = cfg.to_dict()
        for item in overrides:
            set_dotted(raw, *parse_override(item))
        cfg = config_from_dict(raw)
    else:
        cfg = load_config(REPO / row.config, overrides)
        cfg.model.name_or_path = None
        cfg.model.family, cfg.model.arch = row.family, dict(row.arch)
        block, vocab = row.block_size, row.arch["vocab_size"]
    return cfg, block, vocab


def row_config(name: str, args, boundaries: str, extra: list[str], corpora: Path, dist):
    """The run config of one row: the recipe's config (`recipe_config`), random-token data of its block size,
    and (fixed rows) equal segments instead of random ones. On several GPUs the global batch is the row's times
    the GPU count (the same work per GPU: weak scaling, so tokens/s over GPUs x one GPU's tokens/s is the
    scaling efficiency)."""
    from acomp.train.distributed import barrier

    cfg, block, vocab = recipe_config(name, [*args.set, *extra])
    c, t = cfg.compression, cfg.train
    if boundaries == "fixed" and c.randomize_segments:
        per_substep = block // c.training_substeps
        c.randomize_segments = False
        c.segment_lengths = [per_substep // c.segments_per_substep] * c.segments_per_substep
    t.global_batch_size *= dist.world_size
    blocks = max(8, t.global_batch_size * 2)
    if dist.is_main:
        random_corpus(corpora, vocab, block, blocks)
    barrier()  # the other ranks read what rank 0 built
    cfg.data.path = str(random_corpus(corpora, vocab, block, blocks))
    cfg.data.build_if_missing = {}
    t.output_dir = str(corpora / "unused-output")
    t.eval_every = 0
    t.max_steps = max(t.max_steps, args.steps + 2 * args.profile_steps)
    cfg.logging.progress = False
    return cfg


def run_row(cfg, args, dist) -> dict:
    """Build as the launcher does, then `--steps` optimizer steps timed as the trainer times them."""
    import torch
    from torch._dynamo.utils import counters

    from acomp.train.loop import build, seed_everything, step_record, train_step

    seed_everything(cfg.train.seed)
    cuda = dist.device.type == "cuda"
    before = torch.cuda.memory_allocated(dist.device) / 2**30 if cuda else None  # left by earlier rows
    started = time.perf_counter()
    trainer = build(cfg, dist)
    setup_s = time.perf_counter() - started
    trainer.engine.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dist.device)
    records, graphs = [], []  # graphs: how many graphs torch.compile made in each step (recompiles included)
    notices = []  # the trainer's lines (segment checkpointing's `auto` decision)
    try:
        for step in range(args.steps):
            lr = trainer.engine.get_lr()[0]
            if cuda:
                torch.cuda.synchronize(dist.device)
            compiled = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            outputs = train_step(trainer, step)
            if cuda:
                torch.cuda.synchronize(dist.device)
            records.append(step_record(trainer, step + 1, outputs, lr, time.perf_counter() - t0))
            graphs.append(counters["stats"]["unique_graphs"] - compiled)
            if outputs.notice:
                notices.append(outputs.notice)
                if dist.is_main:
                    print(outputs.notice, flush=True)
        # each record's memory_gib is its step's peak (step_record resets the counter after reading it)
        peak = max(r["memory_gib"] for r in records) if cuda else None
        profiled = (
            profile_steps(trainer, args.steps, args.profile_steps, cuda) if args.profile_steps else None
        )
    finally:
        release(trainer)
    first = records[: args.first_steps]
    steady = records[args.first_steps :] or records
    return {
        "status": "ok",
        "setup_s": setup_s,
        "first_tokens_per_s": sum(r["tokens"] for r in first) / sum(r["step_time_s"] for r in first),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "first_mfu": _mean_mfu(first),
        "mfu": statistics.median(r["mfu"] for r in steady) if steady[0]["mfu"] is not None else None,
        "peak_mem_gib": peak,
        "mem_before_gib": before,
        "step_times_s": [round(r["step_time_s"], 4) for r in records],
        "graphs_by_step": graphs,
        "notices": notices,
        "loss": records[-1]["loss"],
        "tokens_per_step": records[-1]["tokens"],
        "profile": profiled,
    }


def profile_steps(trainer, first: int, steps: int, cuda: bool) -> str:
    """`steps` more training steps under torch.profiler: the ops that took the most device time, then (on a
    GPU) the ops that took the most host time, under a line that says whether the steps were bound by the
    device or by the host (device busy time over wall time)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from acomp.train.loop import train_step

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for step in range(first, first + steps):
            train_step(trainer, step)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    sorts = ["self_device_time_total", "self_cpu_time_total"] if cuda else ["self_cpu_time_total"]
    tables = [events.table(sort_by=sort, row_limit=30, max_name_column_width=60) for sort in sorts]
    # Kernel time, as the table's device total sums it (GPU-side annotations left out); kernels that overlap on
    # several streams count once per stream, so read the share as an estimate.
    kernels = (
        e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
    )
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    head = f"profiled steps: {steps}, wall {wall:.3f} s"
    if cuda:
        # The profiler slows the host a little, so the share is lower than in the timed steps.
        share = busy / wall
        bound = "the host bounds the step" if share < 0.8 else "the kernels bound the step"
        head += f"; device busy {busy:.3f} s, {share:.0%} of it ({bound})"
    return "\n\n".join([head, *tables, python_profile(trainer, first + steps, steps)])


def python_profile(trainer, first: int, steps: int) -> str:
    """`steps` more training steps under cProfile: the Python functions with the most own time and the most
    inclusive time. Where the host bounds a step, this says whose Python it is, and where the host waits on the
    device (synchronize, item) it shows as the own time of that call."""
    import cProfile
    import io
    import pstats

    from acomp.train.loop import train_step

    profiler = cProfile.Profile()
    profiler.enable()
    for step in range(first, first + steps):
        train_step(trainer, step)
    profiler.disable()
    tables = []
    for sort in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(40)
        body = text.getvalue()
        tables.append(
            f"Python, {steps} more steps under cProfile, by {sort}:\n" + body[body.find("   ncalls") :]
        )
    return "\n\n".join(tables)


def _mean_mfu(records: list[dict]) -> float | None:
    if records[0]["mfu"] is None:
        return None
    seconds = sum(r["step_time_s"] for r in records)
    return sum(r["mfu"] * r["step_time_s"] for r in records) / seconds


def release(trainer) -> None:
    """Take down a row's engine (hooks, buffers); `free_memory` collects it once no frame holds it."""
    with contextlib.suppress(Exception):
        trainer.engine.destroy()


def free_memory() -> None:
    """Free the GPU between rows (after a failed row too): compiled graphs, the last row's objects (the engine
    and model hold reference cycles, so only the collector frees them, and only after the row's frame is gone),
    the allocator cache. `destroy` leaves two process-wide references to a ZeRO-3 engine's model, dropped here
    as no engine lives between rows: the bottom of DeepSpeed's module stack and the class-level cache of its
    parameter coordinator's release plans."""
    import torch
    from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    FWD_MODULE_STACK.clear()
    plans = getattr(
        PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None
    )
    for cache in [plans, *(cell.cell_contents for cell in getattr(plans, "__closure__", None) or ())]:
        if hasattr(cache, "cache_clear"):  # the lru_cache itself, or under DeepSpeed's nvtx wrapper
            cache.cache_clear()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_rows(args) -> list[dict]:
    rows = []
    for spec in args.rows:
        name, _, only = spec.partition(":")  # llama-1b-z1:random runs one boundary mode
        for boundaries in [only] if only else args.boundaries:
            rows.append({"name": f"{name} {boundaries}", "row": name, "boundaries": boundaries, "extra": []})
    first = args.rows[0].partition(":")[0]
    for spec in args.variant:
        head, _, body = spec.partition(":")
        label, _, recipe = head.partition("@")
        recipe = recipe or first
        extra = [kv for kv in body.split(",") if kv]
        for boundaries in args.boundaries:
            rows.append(
                {"name": f"{recipe} {boundaries} [{label}]", "row": recipe, "boundaries": boundaries,
                 "extra": extra, "variant": label}
            )  # fmt: skip
    return rows


def add_ratios(results: list[dict]) -> None:
    """random/fixed of each recipe (and variant) from the same call."""
    fixed = {
        (r["row"], r.get("variant")): r for r in results if r["boundaries"] == "fixed" and "tokens_per_s" in r
    }
    for r in results:
        ref = fixed.get((r["row"], r.get("variant")))
        if r["boundaries"] == "random" and ref and "tokens_per_s" in r:
            r["random_over_fixed"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["random_over_fixed_first"] = r["first_tokens_per_s"] / ref["first_tokens_per_s"]


def meta(args, dist) -> dict:
    import deepspeed
    import torch
    import transformers

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else platform.processor(),
        "world_size": dist.world_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("PYTORCH_", "TORCH_", "NCCL_"))},
    }  # fmt: skip
    with contextlib.suppress(Exception):
        # "-dirty" when the tree differs from that commit (a copied working tree on a GPU host, say)
        head = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        info["git"] = head.stdout.strip()
    return info


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def graphs_column(by_step: list[int] | None) -> str:
    """Graphs compiled over the row's steps, and the last step that compiled one: "3@11" (late recompiles)."""
    if not by_step:
        return "-"
    last = max((i for i, n in enumerate(by_step) if n), default=-1)
    return f"{sum(by_step)}@{last + 1}" if last >= 0 else "0"


def print_table(results: list[dict]) -> None:
    header = (f"{'row':40} {'first tok/s':>11} {'tok/s':>9} {'first MFU':>9} {'MFU':>6} {'GiB':>6} "
              f"{'rnd/fix':>7} {'(first)':>7} {'step1 s':>7} {'graphs':>6}  status")  # fmt: skip
    print(header + "\n" + "-" * len(header))
    for r in results:
        print(
            f"{r['name'][:40]:40} {fmt(r.get('first_tokens_per_s'), ',.0f'):>11} {fmt(r.get('tokens_per_s'), ',.0f'):>9} "
            f"{fmt(r.get('first_mfu'), '.3f'):>9} {fmt(r.get('mfu'), '.3f'):>6} {fmt(r.get('peak_mem_gib'), '.1f'):>6} "
            f"{fmt(r.get('random_over_fixed'), '.2f'):>7} {fmt(r.get('random_over_fixed_first'), '.2f'):>7} "
            f"{fmt((r.get('step_times_s') or [None])[0], '.1f'):>7} {graphs_column(r.get('graphs_by_step')):>6}  "
            f"{r.get('status', '')[:60]}"
        )  # fmt: skip
    sys.stdout.flush()


def cold_row_out(out: Path, index: int) -> Path:
    """Where the child process of `--cold-compile` row `index` writes its result, beside the call's `--out`."""
    return out.with_name(f"{out.stem}.row{index}.json")


def run_row_cold(index: int, row: dict, argv: list[str], out: Path) -> dict:
    """Row `index` of the plan in a child process (this script with --row-index) whose inductor and triton
    caches start empty; its result, or why it failed."""
    from acomp.train.distributed import RANK_VARIABLES

    with tempfile.TemporaryDirectory(prefix="acomp-bench-cold-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}  # its own process group
        env.update(TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton")
        out = out.resolve()  # the child runs in REPO
        child_out = cold_row_out(out, index)
        child_out.unlink(missing_ok=True)  # never report an earlier call's row
        command = [sys.executable, str(Path(__file__).resolve()), *argv]
        command += ["--row-index", str(index), "--out", str(out)]
        proc = subprocess.run(command, env=env, cwd=REPO)
    try:
        result = json.loads(child_out.read_text())["results"][0]
        child_out.unlink()
        return result
    except (OSError, ValueError, IndexError):
        return {**row, "status": f"error: the row's process exited with {proc.returncode} and no result"}


def save_report(report: Path, info: dict, results: list[dict]) -> None:
    """The call's JSON (rank 0), rewritten after every row so that a crash keeps the rows done."""
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"meta": info, "results": results}, indent=2, default=str))


def end_call_on_row_failure(row, result, dist, report, info, results) -> None:
    """Under torchrun a row that fails on one rank leaves the others waiting in the row's collectives (until the
    process group's timeout), and going on would pair this rank's next collectives with theirs: end the call
    instead, so that torchrun stops every rank. Rank 0 has written the rows before this one after each."""
    print(
        f"train_throughput: row {row['name']!r} failed on rank {dist.rank} of {dist.world_size} "
        f"({result['status']}); ending the call, the rows before it are in {report}",
        file=sys.stderr,
        flush=True,
    )
    if dist.is_main:
        save_report(report, info, [*results, result])
    os._exit(1)  # no clean shutdown: the process group's teardown would wait on the other ranks


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    for item in args.env:
        key, _, value = item.partition("=")
        os.environ[key] = value
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    refuse_bad_overrides(args)
    from acomp.train.distributed import broadcast_object, init_distributed

    started = time.perf_counter()
    dist = init_distributed()
    if dist.device.type != "cuda" and not args.smoke:
        raise SystemExit("benchmarks/train_throughput.py needs a CUDA GPU (or --smoke on CPU)")
    corpora = Path(args.corpus_dir or Path(tempfile.gettempdir()) / "acomp-bench-corpora")
    corpora.mkdir(parents=True, exist_ok=True)
    if args.cold_compile and dist.world_size > 1:
        raise SystemExit(
            "--cold-compile runs rows in child processes: use it on one process, not under torchrun"
        )
    info, results, out = meta(args, dist), [], Path(args.out)
    report = out  # the call's JSON; a --cold-compile child writes its row's beside it
    plan = plan_rows(args)
    if args.row_index is not None:
        plan = plan[args.row_index : args.row_index + 1]
        report = cold_row_out(out, args.row_index)
    for index, row in enumerate(plan):
        over = bool(args.budget_s) and time.perf_counter() - started > args.budget_s
        if broadcast_object(over):
            results.append({**row, "status": "skipped (budget)"})
            continue
        t0 = time.perf_counter()
        result = dict(row)
        if args.cold_compile and args.row_index is None:
            result = run_row_cold(index, row, argv, out)
        else:
            try:
                cfg = row_config(row["row"], args, row["boundaries"], row["extra"], corpora, dist)
                result["settings"] = {k: v for k, v in cfg.to_dict().items() if k != "data"}
                result.update(run_row(cfg, args, dist))
            except Exception as e:  # one failing row must not stop the others
                oom = "out of memory" in str(e).lower()
                result["status"] = "OOM" if oom else f"error: {type(e).__name__}: {str(e)[:400]}"
                if dist.world_size > 1:
                    end_call_on_row_failure(row, result, dist, report, info, results)
            free_memory()
        result["wall_s"] = time.perf_counter() - t0
        table = result.pop("profile", None)
        if table and dist.is_main:
            path = out.with_name(f"{out.stem}.{re.sub(r'[^A-Za-z0-9.-]+', '_', row['name'])}.profile.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table)
            result["profile_file"] = str(path)
        results.append(result)
        add_ratios(results)
        if dist.is_main:
            print(f"[{time.perf_counter() - started:4.0f}s] {row['name']}: {result.get('status')} "
                  f"first {fmt(result.get('first_tokens_per_s'), ',.0f')} tok/s, steady "
                  f"{fmt(result.get('tokens_per_s'), ',.0f')} tok/s, MFU {fmt(result.get('mfu'), '.3f')}, "
                  f"{fmt(result.get('peak_mem_gib'), '.1f')} GiB", flush=True)  # fmt: skip
            save_report(report, info, results)
    if dist.is_main:
        info["total_s"] = time.perf_counter() - started
        save_report(report, info, results)
        if args.row_index is None:  # a --cold-compile child leaves the table to its parent
            print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
