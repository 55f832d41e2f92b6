"""A reproducible quality benchmark: the paper's central result at small scale, offline, on one GPU.

No pretrained weights are reachable, so the base model is pretrained here too:

  data      corpus from this machine's Python sources: the stdlib and every installed package's .py files
            (domains `stdlib` and `site-packages`), split into train / held-out by document, a locally
            trained BPE, 6,144-token single-document blocks (acomp.data.build_corpus);
  pretrain  a Llama-style base (d 768, 12 layers, GQA 12/4 heads, ~115M parameters) trained as a plain
            causal LM on 2,048-token windows (the trainer with summary_length 0: 3 windows per block);
  finetune  that base fine-tuned as an AutoCompressor with the real trainer: 50 summary vectors per
            segment, 6K blocks in 3 BPTT substeps x 2 random segments (about 1,024 tokens each);
  eval      the paper's protocol on held-out blocks (acomp.eval): perplexity of each block's last 1,024
            tokens with no context, behind 50/100/150 (up to 250) summary vectors of 1/2/3 (up to 5)
            compressed 1,024-token segments, and with full attention over the 1,024 plain tokens the
            2,048-token window leaves; the same for the base model (no context, full attention).

Every training stage runs within a wall-clock budget (--minutes; benchmarks/wallclock.py sizes max_steps
from the measured step time so the schedule still decays) and writes its checkpoints under .bench/quality/
(ignored by git), so stages chain across calls. `all` runs every stage in one process.

    python benchmarks/quality.py --stage all                     # one GPU, about 20 minutes: the headline
    python benchmarks/quality.py --stage pretrain --minutes 8    # or one stage per call
    python benchmarks/quality.py --smoke                         # every stage on CPU, tiny, < 2 minutes

Writes .bench/quality/results.json, results.md (the snippet for benchmarks/RESULTS.md) and
ppl_vs_context.png.

Ablations: `--set KEY=VALUE` changes a setting for every run; each `--arm NAME:KEY=VALUE,...` runs the stages
again with settings changed (under .bench/quality/arms/NAME/; the corpus and held-out blocks are always
shared, the base too unless the arm changes a pretraining setting), then ablation.md / ablation.json compare
the headline run with every arm, and frontier.png plots perplexity against summary vectors per segment when
the arms vary the summary length or the mode. Done stages are skipped, so arms can be added call by call:

    python benchmarks/quality.py --stage finetune --arm init-normal:summary_init=normal \\
        --arm k25:summary_length=25 --arm from-scratch:finetune_from=scratch,finetune_minutes=7.5
    VAR="compression.compression_mode=variable,compression.compression_max_len=50"
    python benchmarks/quality.py --stage all --arm "var-0.1:$VAR,compression.compression_lambda=0.1"

`--parallel` trains and evaluates the runs side by side, one process each on the same GPU (`--parallel N`: at
most N at a time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGES = ("data", "pretrain", "finetune", "eval")
PAPER_SEGMENTS = 3  # the paper's headline: 150 vectors = 3 compressed segments of 50
# What ablation.md reads from each run's summary profile (benchmarks/summary_profile.py): its last columns, and
# the commonest kept length that the vectors cell of a variable run names.
PROFILE_COLUMNS = (
    "length_loss_spearman", "nll_hard", "nll_soft", "soft_slots_per_segment", "kv_bytes_per_sample",
    "decode_ms_per_token", "commonest_length", "commonest_length_share",
)  # fmt: skip
# Settings that decide the corpus (shared by every arm: the same held-out targets) and the pretrained base
# (an arm that changes one of these pretrains its own base).
CORPUS_FIELDS = (
    "sources", "vocab", "block_size", "tokenizer_train_chars", "max_train_tokens", "val_tokens", "val_fraction",
    "limit_docs",
)  # fmt: skip
PRETRAIN_FIELDS = (
    *CORPUS_FIELDS, "window", "arch", "precision", "pretrain_lr", "pretrain_warmup", "pretrain_batch",
    "pretrain_micro", "pretrain_minutes", "pretrain_steps", "pretrain_seed", "probe_steps",
)  # fmt: skip


@dataclass
class QualitySettings:
    """Everything the benchmark does, in one place (the full preset; `tiny()` shrinks it)."""

    out: str = ".bench/quality"
    smoke: bool = False
    arm: str = ""  # an ablation arm (its files under <out>/arms/NAME); "" = the headline run
    own_base: bool = False  # the arm changed a pretraining setting, so it pretrains its own base
    changes: dict = field(default_factory=dict)  # the arm's KEY=VALUE changes, as given
    # corpus
    sources: tuple[str, ...] = ("stdlib", "site-packages")
    vocab: int = 16384
    block_size: int = 6144
    tokenizer_train_chars: int = 40_000_000
    max_train_tokens: str | None = "60M"  # per domain
    val_tokens: str | None = "3M"  # per domain
    val_fraction: float = 0.1
    limit_docs: int | None = None
    num_workers: int = field(default_factory=lambda: max(1, min(16, os.cpu_count() or 1)))
    # model (max_position_embeddings = the pretraining window = what full attention may see)
    window: int = 2048
    arch: dict = field(
        default_factory=lambda: dict(
            hidden_size=768,
            intermediate_size=2560,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    )
    precision: str = "auto"  # bf16 on GPU
    # pretraining: plain causal LM, summary_length 0
    pretrain_lr: float = 1.5e-3
    pretrain_warmup: int = 40
    pretrain_batch: int = 16  # blocks per step (x 6,144 tokens)
    pretrain_micro: int = 8
    pretrain_seed: int = 0  # the base's init and data order (an arm that changes it pretrains its own)
    # fine-tuning as an AutoCompressor
    finetune_from: str = "base"  # base = the pretrained base | scratch = the AC objective from the start
    summary_length: int = 50
    summary_init: str = "eos"  # compression.summary_init: eos | normal
    substeps: int = 3
    segments_per_substep: int = 2
    segment_multiple: int = 64
    finetune_lr: float = 1e-3  # the lever study's winner over 5e-4 (benchmarks/RESULTS.md)
    finetune_schedule: str = "cosine"
    finetune_warmup: int = 20
    finetune_batch: int = 16
    finetune_micro: int = 16  # one micro-batch per step: 1.15x the tokens/s of 8 (benchmarks/RESULTS.md)
    finetune_seed: int = 1  # the fine-tuning's data order and segment boundaries (replicates: another)
    # DeepSpeed JSON of the fine-tuning (relative to the repository or absolute; pretraining: zero1.json), e.g.
    # one with "data_types": {"grad_accum_dtype": "fp32"}: gradients accumulated in fp32 rather than bf16
    finetune_deepspeed: str = "ds_configs/zero1.json"
    compression: dict = field(default_factory=dict)  # more compression.* keys (e.g. the variable mode)
    # evaluation
    eval_segment: int = 1024
    segment_length: int = 1024
    max_context_segments: int = 5
    eval_blocks: int = 512
    eval_batch: int = 8
    # A variable-length run is also scored at each of these inference stop thresholds (its frontier points)
    eval_stop_thresholds: tuple[float, ...] = ()
    # A variable-length run is scored with this inference stop rule (compress_stop_rule: cumulative | step;
    # None: the one its saved config records), e.g. `--stage eval --set eval_stop_rule=step` on trained runs
    eval_stop_rule: str | None = None
    # Wall-clock budgets (minutes; pretrain includes building the corpus when it is missing): the headline's,
    # about 20 minutes in all, so that `--stage all` on one GPU reproduces RESULTS.md inside 25 with set-up.
    pretrain_minutes: float = 8.3
    finetune_minutes: float = 9.2
    eval_minutes: float = 2.0
    probe_steps: int = 12  # steps run before max_steps is sized (<= the warmups): compiling settles in them
    # Fixed step counts instead of sizing from the budget (which then only stops a late run): arms that share
    # a GPU (--parallel) train on the same tokens however their speeds differ (e.g. fixed vs variable length).
    pretrain_steps: int | None = None
    finetune_steps: int | None = None

    @classmethod
    def tiny(cls) -> QualitySettings:
        """The --smoke preset: the same stages on CPU with a tiny model and corpus."""
        return cls(
            out=".bench/quality-smoke",
            smoke=True,
            vocab=512,
            block_size=512,
            tokenizer_train_chars=400_000,
            max_train_tokens=None,
            val_tokens=None,
            val_fraction=0.2,
            limit_docs=40,
            num_workers=1,
            window=256,
            arch=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            ),
            precision="fp32",
            pretrain_lr=3e-3,
            pretrain_warmup=3,
            pretrain_batch=4,
            pretrain_micro=4,
            summary_length=4,
            segment_multiple=1,
            finetune_lr=2e-3,
            finetune_warmup=3,
            finetune_batch=4,
            finetune_micro=4,
            eval_segment=64,
            segment_length=64,
            max_context_segments=3,
            eval_blocks=8,
            eval_batch=4,
            pretrain_minutes=0.3,
            finetune_minutes=0.3,
            eval_minutes=0.5,
            probe_steps=2,
        )

    @property
    def root(self) -> Path:
        path = Path(self.out)
        return path if path.is_absolute() else REPO / path

    @property
    def name(self) -> str:
        """What --only calls this run: the arm's name, or `headline`."""
        return self.arm or "headline"

    @property
    def arm_root(self) -> Path:
        return self.root / "arms" / self.arm if self.arm else self.root

    def stage_dir(self, stage: str) -> Path:
        """The corpus and (unless the arm pretrains its own) the base are shared; the rest is per arm."""
        if stage == "corpus" or (stage == "pretrain" and not self.own_base):
            return self.root / stage
        return self.arm_root / stage

    def check(self) -> None:
        """What the budgets and the eval stage need, before any stage runs (ValueError names the value)."""
        for stage in ("pretrain", "finetune", "eval"):
            if not getattr(self, f"{stage}_minutes") > 0:
                raise ValueError(f"{stage}_minutes must be > 0, got {getattr(self, f'{stage}_minutes')}")
        for name in ("eval_blocks", "eval_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        protocol_config(self).check()
        E, S, k = self.eval_segment, self.segment_length, self.max_context_segments
        if k < 1:
            raise ValueError(f"max_context_segments must be >= 1 (summary conditions), got {k}")
        if k * S + E > self.block_size:
            raise ValueError(
                f"max_context_segments={k} x segment_length={S} + eval_segment={E} = {k * S + E} tokens, but "
                f"block_size is {self.block_size}"
            )
        if self.window <= E:
            raise ValueError(f"window={self.window} leaves full attention no context before eval_segment={E}")
        prompt = profile_config(self).prompt_tokens
        if paper_segments(self) * S + prompt > self.block_size:
            raise ValueError(
                f"the summary profile reads {paper_segments(self)} x segment_length={S} + a {prompt}-token "
                f"prompt per block, more than block_size={self.block_size}"
            )

    def changed(self, changes: dict[str, str], arm: str = "") -> QualitySettings:
        """A copy with KEY=VALUE changes (YAML values; `arch.NAME` and `compression.NAME` set one entry);
        with `arm`, the copy is that ablation arm. ValueError names a bad key, value or arm."""
        import typing

        from transformers import CONFIG_MAPPING

        from acomp.config import ConfigError, coerce, parse_override
        from acomp.modeling.config import STOP_RULES
        from acomp.train.preflight import position_budget

        if arm and not arm.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"arm name {arm!r}: use letters, digits, '-', '_' and '.'")
        new = replace(self, arch=dict(self.arch), compression=dict(self.compression))
        if arm:
            new.arm, new.changes = arm, dict(changes)
        hints = typing.get_type_hints(QualitySettings)
        names = set(hints) - {"out", "smoke", "arm", "own_base", "changes"}
        for key, text in changes.items():
            _, value = parse_override(f"{key}={text}")
            group, _, entry = key.partition(".")
            if entry and group in ("arch", "compression"):
                getattr(new, group)[entry] = value
                continue
            if key not in names:
                raise ValueError(
                    f"unknown setting {key!r}; known: {', '.join(sorted(names))}, arch.*, compression.*"
                )
            try:
                setattr(new, key, coerce(value, hints[key], key))
            except ConfigError as e:
                raise ValueError(f"setting {key}={text!r}: {e}") from None
        for value in new.eval_stop_thresholds:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"eval_stop_thresholds must be in [0, 1], got {value}")
        if new.eval_stop_rule not in (None, *STOP_RULES):
            raise ValueError(
                f"eval_stop_rule must be one of {STOP_RULES} (or null), got {new.eval_stop_rule!r}"
            )
        if new.finetune_from not in ("base", "scratch"):
            raise ValueError(f"finetune_from must be base or scratch, got {new.finetune_from!r}")
        if arm:
            moved = [f for f in CORPUS_FIELDS if getattr(new, f) != getattr(self, f)]
            if moved:
                raise ValueError(
                    f"arm {arm!r} changes {', '.join(moved)}: every arm keeps the corpus and its held-out "
                    "blocks (use --set to change them for all)"
                )
            new.own_base = any(getattr(new, f) != getattr(self, f) for f in PRETRAIN_FIELDS)
        who = f"arm {arm!r}" if arm else "settings"
        try:
            new.check()
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None
        # The trainer's own checks, now: a bad value would otherwise stop a run only after the base pretrained.
        try:
            base = pretrain_config(new).model  # the family and positions the fine-tuning's base will have
            position_budget(finetune_config(new), CONFIG_MAPPING[base.family](**base.arch))
        except ConfigError as e:
            raise ValueError(f"{who}: {e}") from None
        return new


# -------------------------------------------------------------------------------------------- stages
def stage_data(settings: QualitySettings) -> dict:
    """Build (or reuse) the corpus; returns its manifest."""
    from acomp.data import build_corpus

    t = time.monotonic()
    manifest = build_corpus(
        list(settings.sources),
        settings.stage_dir("corpus"),
        train_tokenizer_vocab=settings.vocab,
        tokenizer_train_chars=settings.tokenizer_train_chars,
        block_size=settings.block_size,
        max_tokens=settings.max_train_tokens,
        val_tokens=settings.val_tokens,
        val_fraction=settings.val_fraction,
        limit_docs=settings.limit_docs,
        num_workers=settings.num_workers,
        progress=not settings.smoke,
    )
    splits = manifest["splits"]
    print(
        f"data: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} held-out tokens "
        f"({splits['val']['blocks']} held-out blocks) in {time.monotonic() - t:.0f} s",
        flush=True,
    )
    return manifest


def pretrain_config(settings: QualitySettings):
    """Plain causal-LM pretraining of the base: summary_length 0, each block = block/window windows."""
    from acomp.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "family": "llama",
                "arch": {**settings.arch, "max_position_embeddings": settings.window},
            },
            "compression": {
                "summary_length": 0,
                "segment_gradient_checkpointing": False,
                "training_substeps": settings.block_size // settings.window,
                "segments_per_substep": 1,
                "randomize_segments": False,
                "segment_lengths": [settings.window],
            },
            **_common(
                settings,
                "pretrain",
                settings.pretrain_lr,
                settings.pretrain_warmup,
                settings.pretrain_batch,
                settings.pretrain_micro,
                "cosine",
            ),
        }
    )


def finetune_config(settings: QualitySettings):
    """The AutoCompressor fine-tuning of the base with the paper's recipe, scaled: random segments (with
    finetune_from=scratch, the same objective from a random init instead of the base)."""
    from acomp.config import config_from_dict

    if settings.finetune_from == "base":
        model = {"name_or_path": str(settings.stage_dir("pretrain") / "final")}
    else:
        model = {"family": "llama", "arch": {**settings.arch, "max_position_embeddings": settings.window}}
    return config_from_dict(
        {
            "model": model,
            "compression": {
                "summary_length": settings.summary_length,
                "summary_init": settings.summary_init,
                "accumulate_summary": True,
                "segment_gradient_checkpointing": False,
                "training_substeps": settings.substeps,
                "segments_per_substep": settings.segments_per_substep,
                "randomize_segments": True,
                "segment_multiple": settings.segment_multiple,
                **settings.compression,
            },
            **_common(
                settings,
                "finetune",
                settings.finetune_lr,
                settings.finetune_warmup,
                settings.finetune_batch,
                settings.finetune_micro,
                settings.finetune_schedule,
            ),
        }
    )


def _common(
    settings: QualitySettings, stage: str, lr: float, warmup: int, batch: int, micro: int, schedule: str
) -> dict:
    return {
        "data": {"path": str(settings.stage_dir("corpus")), "shuffle": True},
        "optim": {
            "lr": lr,
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "warmup_steps": warmup,
            "schedule": schedule,
            "min_lr_ratio": 0.1,
            "grad_clip": 1.0,
        },
        "train": {
            "output_dir": str(settings.stage_dir(stage)),
            "max_steps": settings.probe_steps,  # sized by wallclock.run_within
            "global_batch_size": batch,
            "micro_batch_size": micro,
            "seed": settings.pretrain_seed if stage == "pretrain" else settings.finetune_seed,
            "deepspeed": str(
                REPO / (settings.finetune_deepspeed if stage == "finetune" else "ds_configs/zero1.json")
            ),
            "precision": settings.precision,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "resume": "auto",
            "export_final": True,
            "eval_every": 0,
        },
        "logging": {"wandb": "disabled", "log_every": 25, "progress": not settings.smoke},
    }


def stage_train(settings: QualitySettings, stage: str, minutes: float, force: bool) -> dict:
    """pretrain or finetune within `minutes` (pretrain: corpus build included); skipped when done."""
    from wallclock import run_within

    from acomp.train import Preempted

    out = settings.stage_dir(stage)
    done = out / "stage.json"
    base = settings.stage_dir("pretrain")
    base_done = base / "stage.json"
    from_base = settings.finetune_from == "base"
    stale = (
        stage == "finetune"
        and from_base
        and done.is_file()
        and base_done.is_file()
        and base_done.stat().st_mtime > done.stat().st_mtime
    )
    if done.is_file() and (out / "final" / "config.json").is_file() and not (force or stale):
        print(f"{stage}: done already ({out / 'final'}); --force to redo", flush=True)
        return json.loads(done.read_text())
    if stale:
        print("finetune: the pretrained base is newer than this fine-tuning; redoing it", flush=True)
    if stage == "finetune" and from_base and not (base / "final" / "config.json").is_file():
        raise SystemExit(
            f"finetune needs the pretrained base at {base / 'final'}: run --stage pretrain first"
        )
    if out.exists():
        print(f"{stage}: removing the incomplete run at {out}", flush=True)
        shutil.rmtree(out)
    started = time.monotonic()
    deadline = started + minutes * 60
    if stage == "pretrain" or not (settings.stage_dir("corpus") / "manifest.json").is_file():
        stage_data(settings)  # a fine-tuning from scratch reads the headline run's corpus as it is
    cfg = pretrain_config(settings) if stage == "pretrain" else finetune_config(settings)
    try:
        result = run_within(
            cfg,
            deadline=deadline,
            probe_steps=settings.probe_steps,
            steps=getattr(settings, f"{stage}_steps"),
            log=lambda m: print(f"{stage}: {m}", flush=True),
        )
    except Preempted as e:  # not the deadline: the stage stays undone, and the next call starts it again
        print(f"{stage}: {e}; the stage is not done: the next call starts it again", file=sys.stderr)
        received = getattr(signal, e.signal_name, None)  # "SIGTERM", or a signal seen by another rank
        raise SystemExit(128 + received if received else 1) from None  # as if the signal had ended it
    tokens, median_rate = _throughput(out / "metrics.jsonl")
    info = {
        "stage": stage,
        "minutes_budget": minutes,
        "seconds": time.monotonic() - started,
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "step_seconds": result.step_seconds,
        "setup_seconds": result.setup_seconds,
        "stopped_at_deadline": result.stopped_at_deadline,
        "tokens": tokens,
        "tokens_per_s": tokens / (result.steps * result.step_seconds) if result.steps else None,
        "median_tokens_per_s": median_rate,  # the trainer's per-step figure, over every step
        "config": asdict(cfg),
    }
    done.write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"{stage}: {result.steps} steps, {tokens:,} tokens in {info['seconds']:.0f} s "
        f"({result.step_seconds:.3f} s/step)",
        flush=True,
    )
    return info


def _throughput(metrics: Path) -> tuple[int, float | None]:
    """(tokens seen, median of the per-step tokens_per_s) of a trainer's metrics.jsonl."""
    from wallclock import step_values

    rates = step_values(metrics, "tokens_per_s")
    seen = step_values(metrics, "tokens_seen")
    return int(max(seen.values(), default=0)), statistics.median(rates.values()) if rates else None


def eval_device(settings: QualitySettings):
    """The device and dtype models are evaluated in: the GPU in bf16, or the CPU (smoke) in fp32."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not settings.smoke else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def stage_eval(settings: QualitySettings, minutes: float, time_decode: bool = True) -> dict:
    """The protocol on held-out blocks for the AutoCompressor and for its base (an arm that shares the
    headline run's base skips it: those rows are the headline's), then its summary profile (the decode
    untimed on a shared device: `time_decode_alone`) and where its gap lies (copies from the context or not)."""
    from copy_split import copy_split
    from summary_profile import profile

    from acomp import AutoCompressorModel
    from acomp.eval import CorpusBlocks, evaluate, report

    models = [("autocompressor", settings.stage_dir("finetune"))]
    if pretrains(settings):
        models.append(("base", settings.stage_dir("pretrain")))
    for _, path in models:
        if not (path / "final" / "config.json").is_file():
            raise SystemExit(f"eval needs {path / 'final'}: run --stage {path.name} first")
    started = time.monotonic()
    device, dtype = eval_device(settings)
    cfg = protocol_config(settings)
    blocks = CorpusBlocks(str(settings.stage_dir("corpus")), "val")
    results = {}
    variable = settings.compression.get("compression_mode") == "variable"
    # The AutoCompressor gets 3/4 of the budget when its base (two conditions) is evaluated too.
    ac_share = 0.75 if len(models) == 2 else 1.0
    for name, path in models:
        fields = inference_fields(settings) if name == "autocompressor" else {}
        model = AutoCompressorModel.from_pretrained(str(path / "final"), dtype=dtype, **fields).to(device)
        if name == "autocompressor":
            deadline = started + ac_share * minutes * 60
        else:  # at least the last quarter, however long the untimed profile and split took
            deadline = max(started + minutes * 60, time.monotonic() + (1 - ac_share) * minutes * 60)
        thresholds = settings.eval_stop_thresholds if name == "autocompressor" and variable else ()
        result = evaluate(
            model,
            blocks,
            replace(cfg, stop_thresholds=thresholds),
            device=device,
            progress=not settings.smoke,
            deadline=deadline,
            keep_records=name == "autocompressor",  # per-block NLL: paired comparisons between runs
        )
        if result.blocks < result.blocks_selected:
            print(
                f"eval: {name} stopped at the deadline after {result.blocks} of {result.blocks_selected} blocks"
            )
        results[name] = result
        if name == "autocompressor":
            profiled = profile(model, blocks, profile_config(settings), device, time_decode=time_decode)
            split = copy_split(model, blocks, copy_split_config(settings), device)
        del model
    ac = results["autocompressor"]
    report.plot(ac, settings.arm_root / "ppl_vs_context.png", title="AutoCompressor (quality benchmark)")
    print(report.markdown(ac, title="AutoCompressor, all conditions"), flush=True)
    return {
        "results": results,
        "profile": profiled,
        "copy_split": split,
        "seconds": time.monotonic() - started,
        "device": _device_name(device),
    }


def time_decode_alone(settings: QualitySettings) -> None:
    """Time the decode of a run profiled on a shared device (--parallel), now that it has the device alone, and
    write the time into its results.json and results.md."""
    from summary_profile import decode_ms_per_token

    from acomp import AutoCompressorModel
    from acomp.eval import CorpusBlocks

    results = settings.arm_root / "results.json"
    data = json.loads(results.read_text())
    prof = data.get("summary_profile")  # absent from results.json written before the profile existed
    if prof is None or prof["decode_ms_per_token"] is not None:
        return
    device, dtype = eval_device(settings)
    path = settings.stage_dir("finetune") / "final"
    model = AutoCompressorModel.from_pretrained(str(path), dtype=dtype, **inference_fields(settings)).to(
        device
    )
    blocks = CorpusBlocks(str(settings.stage_dir("corpus")), "val")
    prof["decode_ms_per_token"] = decode_ms_per_token(model, blocks, profile_config(settings), device)
    results.write_text(json.dumps(data, indent=2) + "\n")
    snippet = settings.arm_root / "results.md"
    lines = [
        profile_line(prof) if line.startswith(PROFILE_LINE) else line
        for line in snippet.read_text().split("\n")
    ]
    snippet.write_text("\n".join(lines))
    print(f"{settings.name}: decode timed alone: {prof['decode_ms_per_token']:.2f} ms/token", flush=True)


def inference_fields(settings: QualitySettings) -> dict:
    """Model-config overrides the fine-tuned model is evaluated with (the stop rule, when one is set)."""
    return {} if settings.eval_stop_rule is None else {"compress_stop_rule": settings.eval_stop_rule}


def protocol_config(settings: QualitySettings):
    """The paper's protocol as the eval stage runs it (full attention inside the base's window)."""
    from acomp.eval import ProtocolConfig

    return ProtocolConfig(
        eval_segment=settings.eval_segment,
        segment_length=settings.segment_length,
        max_context_segments=settings.max_context_segments,
        fa_window=settings.window,
        batch_size=settings.eval_batch,
        max_blocks=settings.eval_blocks,
    )


def paper_segments(settings: QualitySettings) -> int:
    """The compressed segments the profile and the copy split read: the paper's 3, or all the eval has."""
    return min(PAPER_SEGMENTS, settings.max_context_segments)


def profile_config(settings: QualitySettings):
    """The summary profile of the eval stage: the paper's 3 compressed segments before the scored one."""
    from summary_profile import ProfileConfig

    return ProfileConfig(
        segment=settings.segment_length,
        segments=paper_segments(settings),
        max_blocks=min(64, settings.eval_blocks),
        batch=settings.eval_batch,
    )


def copy_split_config(settings: QualitySettings):
    """Where the headline's gap lies: the paper's 3 compressed segments and the headline's full attention."""
    from copy_split import CopySplitConfig

    return CopySplitConfig(
        segment=settings.segment_length,
        segments=paper_segments(settings),
        eval_segment=settings.eval_segment,
        fa_context=min(settings.window, settings.block_size) - settings.eval_segment,
        max_blocks=min(64, settings.eval_blocks),
        batch=settings.eval_batch,
    )


# ------------------------------------------------------------------------------------------- summary
def headline(ac, base, summary_length: int) -> dict:
    """The numbers RESULTS.md records: ppl with no context, behind 1..3 segments' summary vectors (every
    slot; a variable-length model also where it stops) and with full attention, and the share of the
    no-context -> FA gap each condition closes. `base` (the pretrained model) may be None."""
    from acomp.eval import FULL_ATTENTION, NO_CONTEXT, SUMMARY, SUMMARY_VARIABLE, gap_share, report

    def longest_full_attention(result):
        conditions = [c for c in result.conditions if c.kind == FULL_ATTENTION]
        return max(conditions, key=lambda c: c.context_tokens, default=None)

    fa = longest_full_attention(ac)
    rows = [{"condition": "no context", "context_tokens": 0, "summary_vectors": 0, "name": NO_CONTEXT}]
    for c in ac.conditions:
        if c.kind in (SUMMARY, SUMMARY_VARIABLE):
            vectors = ac.overall[c.name].summary_vectors
            label = report.line_label(c)
            rows.append(
                {
                    "condition": f"{vectors:.0f} {label}" if c.kind == SUMMARY else f"{vectors:.1f} {label}",
                    "context_tokens": c.context_tokens,
                    "summary_vectors": vectors,
                    "segments": len(c.context_segments),
                    "name": c.name,
                    "stop_threshold": c.stop_threshold,
                }
            )
    if fa is not None:
        rows.append(
            {
                "condition": "full attention",
                "context_tokens": fa.context_tokens,
                "summary_vectors": 0,
                "name": fa.name,
            }
        )
    for row in rows:
        stat = ac.overall[row["name"]]
        row.update(ppl=stat.ppl, loss=stat.loss, tokens=stat.tokens)
        if fa is not None:
            row["gap_closed_loss"] = gap_share(ac, row["name"], fa.name, on="loss")
            row["gap_closed_ppl"] = gap_share(ac, row["name"], fa.name, on="ppl")
    base_rows = [
        {
            "condition": f"base: {'no context' if c.kind == NO_CONTEXT else 'full attention'}",
            "context_tokens": c.context_tokens,
            "ppl": base.overall[c.name].ppl,
            "loss": base.overall[c.name].loss,
        }
        for c in (base.conditions if base is not None else ())
        if c.kind == NO_CONTEXT or c is longest_full_attention(base)
    ]
    return {
        "rows": rows,
        "base": base_rows,
        "fa": None if fa is None else fa.name,
        "summary_length": summary_length,
    }


def markdown_snippet(
    settings: QualitySettings, info: dict, head: dict, ac, base, prof: dict, split: dict
) -> str:
    from acomp.eval import report

    nc = ac.overall["no_context"]
    domains = ", ".join(f"{d} {s['no_context'].blocks} blocks" for d, s in ac.domains.items())
    pre, fine = info["pretrain"], info["finetune"]
    if pre is not None:
        training = (
            f"pretrained as a plain causal LM on {settings.window}-token windows for {pre['steps']} steps "
            f"({pre['tokens'] / 1e6:.1f}M tokens, {pre['seconds'] / 60:.1f} min), then fine-tuned as an AutoCompressor"
        )
    else:
        training = "trained from a random init as an AutoCompressor"
    title = "Quality: the paper's central result at small scale"
    if settings.arm:
        changes = ", ".join(f"{k}={v}" for k, v in settings.changes.items())
        title = f"Quality, ablation arm `{settings.arm}` ({changes})"
    lines = [
        f"## {title}",
        "",
        f"Recorded {info['date']} on {info['device']}; {info['versions']}. Command: `{info['command']}`.",
        "",
        f"Base: Llama-style, {info['params'] / 1e6:.0f}M parameters (d {settings.arch['hidden_size']}, "
        f"{settings.arch['num_hidden_layers']} layers, {settings.arch['num_attention_heads']}/{settings.arch['num_key_value_heads']} "
        f"query/KV heads, vocab {settings.vocab}), {training} "
        f"({settings.summary_length} summary vectors per segment, {settings.block_size}-token blocks in {settings.substeps} "
        f"substeps x {settings.segments_per_substep} random segments) for {fine['steps']} steps "
        f"({fine['tokens'] / 1e6:.1f}M tokens, {fine['seconds'] / 60:.1f} min). "
        f"Corpus: this machine's stdlib and installed packages' sources, split by document; "
        f"{info['corpus']['train_tokens'] / 1e6:.1f}M training tokens.",
        "",
        f"Held-out: {nc.blocks} blocks ({domains}); perplexity of each block's last {settings.eval_segment - 1} "
        f"tokens (the final {settings.eval_segment}-token segment), {nc.tokens:,} target tokens, the same in every row.",
        "",
        "| context | context tokens | ppl | gap closed (loss) | gap closed (ppl) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in head["rows"]:
        loss_share = row.get("gap_closed_loss")
        ppl_share = row.get("gap_closed_ppl")
        lines.append(
            f"| {row['condition']} | {row['context_tokens']:,} | {row['ppl']:.3f} | "
            f"{'-' if loss_share is None else f'{loss_share:.1%}'} | {'-' if ppl_share is None else f'{ppl_share:.1%}'} |"
        )
    for row in head["base"]:
        lines.append(f"| {row['condition']} | {row['context_tokens']:,} | {row['ppl']:.3f} | | |")
    lines += [
        "",
        "Gap closed = (x_no_context - x_summary) / (x_no_context - x_full_attention), on the mean loss "
        "(log-perplexity; the headline) and on perplexity, all from the AutoCompressor's own weights. The base "
        "rows are the pretrained model before fine-tuning, for reference.",
        "",
        profile_line(prof),
        "",
        copy_split_line(split),
        "",
        report.markdown(ac, title="All conditions, per domain"),
    ]
    return "\n".join(lines)


PROFILE_LINE = "Summary profile ("


def profile_line(prof: dict) -> str:
    corr, ms = prof["length_loss_spearman"], prof["decode_ms_per_token"]
    return (
        f"{PROFILE_LINE}{prof['blocks']} blocks x {prof['segments']} segments of {prof['segment']} tokens): "
        f"{prof['mean_vectors_per_segment']:.1f} vectors kept per segment; rank correlation of vectors kept with the "
        f"segment's no-context loss: {'- (the same number everywhere)' if corr is None else f'{corr:.2f}'}; greedy decoding of "
        f"{prof['new_tokens']} tokens behind them, batch {prof['decode_batch']}: "
        f"{'not timed (a shared device)' if ms is None else f'{ms:.2f} ms/token'}, KV cache {prof['kv_bytes_per_sample'] / 2**20:.2f} MiB per sample "
        f"({prof['cache_summary_slots']} summary slots + {prof['prompt_tokens']} prompt + {prof['new_tokens']} new tokens)."
        + presence_sentence(prof)
    )


def copy_split_line(split: dict) -> str:
    copy, rest = split["copy"], split["rest"]
    return (
        f"Where the gap lies ({split['blocks']} blocks; benchmarks/copy_split.py): "
        f"{split['copy_share_of_targets']:.1%} of the targets continue a {split['ngram']}-gram of full attention's "
        f"{split['fa_context']:,}-token context (copies) and hold {split['copy_share_of_fa_gain']:.1%} of its gain "
        f"over no context; it gains {copy['loss_no_context'] - copy['loss_full_attention']:.3f} nats per copy and "
        f"{rest['loss_no_context'] - rest['loss_full_attention']:.3f} per other target. "
        f"The summaries of {split['segments']} segments close {copy['gap_closed']:.1%} of the gap "
        f"on copies and {rest['gap_closed']:.1%} on the rest."
    )


def presence_sentence(prof: dict) -> str:
    from summary_profile import SOFT_PRESENT

    if prof.get("nll_hard") is None:  # a fixed-length model (or a results.json from before the check)
        return ""
    return (
        f" Segments after the first: {prof['nll_hard']:.4f} nats/token behind the kept vectors (inference) vs "
        f"{prof['nll_soft']:.4f} behind soft presence (every slot weighted by its survival), which keeps {prof['soft_slots_per_segment']:.1f} "
        f"slots per segment at survival >= {SOFT_PRESENT}."
    )


def summarize(settings: QualitySettings, evaluated: dict, command: str) -> dict:
    import torch
    import transformers

    from acomp.eval import report

    ac, base = evaluated["results"]["autocompressor"], evaluated["results"].get("base")
    finetuned = settings.stage_dir("finetune")
    pretrained = settings.stage_dir("pretrain") / "stage.json"
    manifest = json.loads((settings.stage_dir("corpus") / "manifest.json").read_text())
    cfg = json.loads((finetuned / "final" / "config.json").read_text())
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "device": evaluated["device"],
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "command": command,
        "params": _count_params(finetuned / "final"),
        "pretrain": json.loads(pretrained.read_text()) if settings.finetune_from == "base" else None,
        "finetune": json.loads((finetuned / "stage.json").read_text()),
        "corpus": {
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "val_blocks": manifest["splits"]["val"]["blocks"],
            "domains": {d: v["tokens"] for d, v in manifest["splits"]["train"]["domains"].items()},
        },
        "model_config": {
            k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size", "summary_length")
        },
    }
    head = headline(ac, base, settings.summary_length)
    data = {
        "settings": asdict(settings),
        "info": info,
        "headline": head,
        "autocompressor": report.to_dict(ac),
        "base": None if base is None else report.to_dict(base),
        "summary_profile": evaluated["profile"],
        "copy_split": evaluated["copy_split"],
        "eval_seconds": evaluated["seconds"],
    }
    for stage in ("pretrain", "finetune"):
        if info[stage] is not None:
            info[stage].pop("config", None)
    out = settings.arm_root
    (out / "results.json").write_text(json.dumps(report.finite_json(data), indent=2) + "\n")
    snippet = markdown_snippet(settings, info, head, ac, base, evaluated["profile"], evaluated["copy_split"])
    (out / "results.md").write_text(snippet)
    print(snippet, flush=True)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'ppl_vs_context.png'}")
    return data


def _count_params(model_dir: Path) -> int:
    """Parameters of an exported model, summary table excluded (the base's size)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key != "embed_summary.weight":
                    n = 1
                    for size in st.get_slice(key).get_shape():
                        n *= int(size)
                    total += n
    return total


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------- arms
def arm_row(settings: QualitySettings) -> dict:
    """One ablation-table row from a run's results.json: the summary condition over one compressed segment
    and over the most (a variable-length model: where it stops), each with its share of the gap closed."""
    data = json.loads((settings.arm_root / "results.json").read_text())
    rows = {row["name"]: row for row in data["headline"]["rows"]}
    variable = any(name.startswith("summary_variable_") for name in rows)
    kind = "summary_variable" if variable else "summary"
    by_threshold: dict = {}  # stop threshold (None: the run's own) -> its summary rows by segment count
    for name, row in rows.items():
        if name.startswith(f"{kind}_"):
            by_threshold.setdefault(row.get("stop_threshold"), []).append(row)
    ends = {t: _first_paper_last(summaries) for t, summaries in by_threshold.items()}
    fa = rows.get(data["headline"]["fa"] or "")
    first, paper, last = ends.pop(None)
    fine = data["info"]["finetune"]
    prof = data.get("summary_profile") or {}  # absent from results.json written before the profile existed
    split = data.get("copy_split") or {}  # absent from results.json written before the split existed
    return {
        "arm": settings.arm or "default",
        "changes": settings.changes,
        "mode": "variable" if variable else "fixed",
        "finetune_steps": fine["steps"],
        "finetune_tokens": fine["tokens"],
        "vectors_per_segment": last["summary_vectors"] / last["segments"],
        "segments": last["segments"],
        "ppl_no_context": rows["no_context"]["ppl"],
        "ppl_one_segment": first["ppl"],
        "ppl_all_segments": last["ppl"],
        "ppl_full_attention": None if fa is None else fa["ppl"],
        "gap_one_segment": first.get("gap_closed_loss"),
        "gap_all_segments": last.get("gap_closed_loss"),
        "gap_paper_segments": paper.get("gap_closed_loss"),
        "length_settled_step": (
            length_settled_step(settings.stage_dir("finetune") / "metrics.jsonl") if variable else None
        ),
        **{key: prof.get(key) for key in PROFILE_COLUMNS},
        "gap_copies": split.get("copy", {}).get("gap_closed"),
        "gap_rest": split.get("rest", {}).get("gap_closed"),
        "threshold_points": [
            {
                "stop_threshold": t,
                "vectors_per_segment": last_t["summary_vectors"] / last_t["segments"],
                "ppl_all_segments": last_t["ppl"],
                "gap_paper_segments": paper_t.get("gap_closed_loss"),
            }
            for t, (_, paper_t, last_t) in sorted(ends.items())
        ],
    }


def _first_paper_last(summaries: list[dict]) -> tuple[dict, dict, dict]:
    """The summary rows over one segment, over the paper's segments (else the most) and over the most."""
    summaries = sorted(summaries, key=lambda r: r["segments"])
    paper = next((r for r in summaries if r["segments"] == PAPER_SEGMENTS), summaries[-1])
    return summaries[0], paper, summaries[-1]


def length_settled_step(metrics: Path) -> int | None:
    """The fine-tuning step from which the logged mean summary length stays within 10% (at least one vector) of
    its final value. A variable model's lengths fall late and in a few steps (docs/VARIABLE_LENGTH.md): the
    steps after this one are what its kept vectors had to learn to carry a segment. None without lengths."""
    from wallclock import step_values

    if not metrics.is_file():
        return None
    lengths = step_values(metrics, "summary_length")
    if not lengths:
        return None
    final = lengths[max(lengths)]
    settled = min(lengths)
    for step, length in lengths.items():
        if abs(length - final) > max(1.0, 0.1 * final):
            settled = None
        elif settled is None:
            settled = step
    return settled


def write_ablation(runs: list[QualitySettings]) -> None:
    """ablation.md / ablation.json over the headline run and its arms, and frontier.png (ppl behind the
    most segments vs summary vectors per segment, fixed and variable) when the arms vary the length."""
    table = [arm_row(s) for s in runs if (s.arm_root / "results.json").is_file()]
    root = runs[0].root
    (root / "ablation.json").write_text(json.dumps(table, indent=2) + "\n")
    k = table[0]["segments"] if table else 0
    gaps = {"gap_one_segment": 1, "gap_paper_segments": PAPER_SEGMENTS, "gap_all_segments": k}
    if k == PAPER_SEGMENTS:  # a shorter protocol (--smoke): the paper's column is the last one
        del gaps["gap_all_segments"]
    header = [
        "arm", "changes", "fine-tune steps (tokens)", "vectors / segment", "length settled at step",
        "ppl: no context", "ppl: 1 segment", f"ppl: {k} segments", "ppl: full attention",
        *(f"gap closed: {n} segment{'s' * (n > 1)}" for n in gaps.values()),
        f"gap closed, {PAPER_SEGMENTS} segments: copies / rest", "corr(kept, loss)",
        "nats lost at inference (slots soft presence keeps)", "KV MiB / sample", "decode ms / token",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for r in table:
        changes = ", ".join(f"{key}={value}" for key, value in r["changes"].items()) or "(defaults)"
        kv = r["kv_bytes_per_sample"]
        cells = [
            _num(r["length_settled_step"], "d"),
            *(_num(r[key], ".3f") for key in ("ppl_no_context", "ppl_one_segment", "ppl_all_segments")),
            _num(r["ppl_full_attention"], ".3f"),
            *(_num(r[key], ".1%") for key in gaps),
            f"{_num(r['gap_copies'], '.1%')} / {_num(r['gap_rest'], '.1%')}",
            _num(r["length_loss_spearman"], ".2f"),
            presence_cell(r),
            _num(None if kv is None else kv / 2**20, ".2f"),
            _num(r["decode_ms_per_token"], ".2f"),
        ]
        lines.append(
            f"| {r['arm']} | {changes} | {r['finetune_steps']} ({r['finetune_tokens'] / 1e6:.1f}M) | "
            f"{r['vectors_per_segment']:.1f}{length_note(r)} | " + " | ".join(cells) + " |"
        )
    sweep = [(r["arm"], point) for r in table for point in r["threshold_points"]]
    if sweep:
        lines += [
            "",
            f"| arm | stop threshold | vectors / segment | ppl: {k} segments | gap closed: {PAPER_SEGMENTS} segments |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {arm} | {pt['stop_threshold']!r} | {pt['vectors_per_segment']:.2f} | {pt['ppl_all_segments']:.3f} | "
            f"{_num(pt['gap_paper_segments'], '.1%')} |"
            for arm, pt in sweep
        ]
    comparison = against_fixed(table)
    if comparison:
        lines += [
            "",
            f"Against the fixed frontier (gap closed behind {PAPER_SEGMENTS} segments): a variable run wins where"
            " it beats the fewest fixed vectors at or above its own mean:",
            "",
            "| variable run | vectors / segment | gap closed | fewest fixed vectors at or above it | their gap"
            " closed | difference | fixed frontier at its mean (log-linear) | difference |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {c['label']} | {c['vectors']:.2f} | {c['gap']:.1%} | {c['above_label'] or '-'} | "
            f"{_num(c['above_gap'], '.1%')} | {_points(c['gap'], c['above_gap'])} | {_num(c['interpolated'], '.1%')} | "
            f"{_points(c['gap'], c['interpolated'])} |"
            for c in comparison
        ]
        spreads = replicate_spreads(table)
        if spreads:
            lines += ["", "Seed replicates: " + "; ".join(spreads) + "."]
    import length_headroom

    fixed = length_headroom.fixed_runs(root)
    headroom = length_headroom.markdown(length_headroom.headroom(*length_headroom.from_results(fixed)))
    if headroom:
        lines += ["", "Room for learned lengths (benchmarks/length_headroom.py), one compressed segment:", ""]
        lines += headroom
    (root / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    lengths = {(r["mode"], round(r["vectors_per_segment"], 1)) for r in table}
    if len(lengths) > 1 or sweep:
        plot_frontier(table, root / "frontier.png")
    print(f"wrote {root / 'ablation.md'}, {root / 'ablation.json'}", flush=True)


def against_fixed(table: list[dict]) -> list[dict]:
    """Each variable frontier run (and its other stop thresholds) against the fixed frontier: the fewest fixed
    vectors at or above its mean (a win is beating them), and the fixed frontier at its mean, linear
    in log vectors between the fixed points around it (None outside their range)."""
    points = frontier_points(table)
    # Lengths compare at the table's precision (2.04 vectors count as 2.0); a run without summaries has no log.
    fixed = [
        p for p in points if p["mode"] == "fixed" and p["gap"] is not None and round(p["vectors"], 1) > 0
    ]
    variable = [
        {"label": r["arm"], "vectors": r["vectors_per_segment"], "gap": r["gap_paper_segments"]}
        for r in table
        if r["mode"] == "variable" and on_frontier(r)
    ] + [p for p in points if p["mode"] == "variable" and "threshold" in p]
    out = []
    for v in variable:
        if v["gap"] is None or not fixed:
            continue
        length = round(v["vectors"], 1)
        above = next((f for f in fixed if round(f["vectors"], 1) >= length), None)
        interpolated = None
        for lo, hi in zip(fixed, fixed[1:]):
            a, b = round(lo["vectors"], 1), round(hi["vectors"], 1)
            if a <= length <= b:
                t = math.log(length / a) / math.log(b / a) if b > a else 0.0
                interpolated = lo["gap"] + t * (hi["gap"] - lo["gap"])
                break
        out.append(
            {
                "label": v["label"],
                "vectors": v["vectors"],
                "gap": v["gap"],
                "above_label": above and above["label"],
                "above_gap": above and above["gap"],
                "interpolated": interpolated,
            }
        )
    return out


def replicate_spreads(table: list[dict]) -> list[str]:
    """For each frontier setting trained with more than one seed (runs that differ in nothing but
    `finetune_seed`; a fixed length counts by its vectors): the runs and how far apart their gap shares are.
    Variable runs get their own spread: a learned length adds the noise of where it settles."""
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        if r["gap_paper_segments"] is None or not on_frontier(r):
            continue
        fixed_length = round(r["vectors_per_segment"], 1) if r["mode"] == "fixed" else None
        seed_free = ("finetune_seed", "summary_length") if fixed_length is not None else ("finetune_seed",)
        rest = tuple(sorted((k, str(v)) for k, v in r["changes"].items() if k not in seed_free))
        groups.setdefault((r["mode"], fixed_length, rest), []).append(r)
    return [
        f"{', '.join(r['arm'] for r in rows)}: {100 * (max(g) - min(g)):.1f} points apart"
        for rows in groups.values()
        if len(rows) > 1
        for g in [[r["gap_paper_segments"] for r in rows]]
    ]


def _points(a: float, b: float | None) -> str:
    """a - b in points of the gap."""
    return "-" if b is None else f"{100 * (a - b):+.1f}"


def length_note(row: dict) -> str:
    """After a variable run's mean vectors: the share of profiled segments at its commonest length."""
    if row["mode"] != "variable":
        return ""
    if row.get("commonest_length_share") is None:  # results.json written before the profile reported it
        return " (variable)"
    return f" (variable; {row['commonest_length_share']:.0%} at {row['commonest_length']:g})"


def presence_cell(row: dict) -> str:
    """A variable model's held-out loss behind hard presence (inference) minus soft presence (every slot weighted
    by its survival), and the slots per segment soft presence keeps (summary_profile.py)."""
    if row.get("nll_hard") is None:
        return "-"
    return f"{row['nll_hard'] - row['nll_soft']:+.4f} ({row['soft_slots_per_segment']:.1f})"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# with compression.*: what a frontier arm may change
LENGTH_SETTINGS = ("summary_length", "finetune_seed", "eval_stop_thresholds", "eval_stop_rule")


def on_frontier(row: dict) -> bool:
    """A run that changes only the summary length, compression settings or a seed (not e.g. the learning rate)."""
    return all(key in LENGTH_SETTINGS or key.startswith("compression.") for key in row["changes"])


def frontier_points(table: list[dict]) -> list[dict]:
    """The frontier's points: runs that change only the summary length, compression settings or a seed (so not
    e.g. a learning-rate arm), replicates at the same (mode, length) averaged into one point, and a variable
    run's points at other stop thresholds (eval_stop_thresholds), each its own."""
    groups: dict[tuple, list[dict]] = {}
    points = []
    for r in table:
        if on_frontier(r):
            groups.setdefault((r["mode"], round(r["vectors_per_segment"], 1)), []).append(r)
            points += [
                {
                    "mode": r["mode"],
                    "label": f"{r['arm']} t{pt['stop_threshold']!r}",
                    "threshold": pt["stop_threshold"],
                    "vectors": pt["vectors_per_segment"],
                    "ppl": pt["ppl_all_segments"],
                    "gap": pt["gap_paper_segments"],
                }
                for pt in r.get("threshold_points", ())
            ]
    for (mode, _), rows in sorted(groups.items()):
        gaps = [r["gap_paper_segments"] for r in rows]
        points.append(
            {
                "mode": mode,
                "label": ", ".join(r["arm"] for r in rows),
                "vectors": statistics.fmean(r["vectors_per_segment"] for r in rows),
                "ppl": statistics.fmean(r["ppl_all_segments"] for r in rows),
                "gap": None if None in gaps else statistics.fmean(gaps),
            }
        )
    return sorted(points, key=lambda p: (p["mode"], p["vectors"]))


def plot_frontier(table: list[dict], path: Path) -> None:
    """Two panels against summary vectors per segment, fixed and variable arms as two lines: the held-out ppl
    behind all segments, and the share of the gap closed behind the paper's segments (each model against its
    own no-context and full-attention loss, which differ between arms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = frontier_points(table)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        ("ppl", f"held-out ppl behind {table[0]['segments']} compressed segments"),
        ("gap", f"gap closed behind {PAPER_SEGMENTS} segments"),
    )
    for ax, (key, label) in zip(axes, panels):
        values = [p[key] for p in points if p[key] is not None]
        span = ((max(values) - min(values)) or 1.0) if values else 1.0
        labelled = []
        for mode, marker in (("fixed", "o"), ("variable", "s")):
            rows = [p for p in points if p["mode"] == mode and p[key] is not None]
            if rows:
                ax.plot([p["vectors"] for p in rows], [p[key] for p in rows], marker=marker, label=mode)
                for p in rows:
                    # Points that nearly coincide (one model at nearby stop thresholds) stack their labels.
                    near = sum(
                        q["vectors"] > 0
                        and p["vectors"] > 0
                        and abs(math.log2(q["vectors"] / p["vectors"])) < 0.15
                        and abs(q[key] - p[key]) < 0.03 * span
                        for q in labelled
                    )
                    labelled.append(p)
                    ax.annotate(
                        p["label"],
                        (p["vectors"], p[key]),
                        xytext=(4, 6 + 9 * near),
                        textcoords="offset points",
                        fontsize=7,
                    )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("summary vectors per segment (mean)")
        ax.set_ylabel(label)
    axes[0].axhline(table[0]["ppl_no_context"], color="gray", linestyle="--", label="no context (first run)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_changes(items: list[str], what: str) -> dict[str, str]:
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        changes[key.strip()] = value.strip()
    return changes


def pretrains(settings: QualitySettings) -> bool:
    """Whether the run pretrains a base: the headline run, and each arm that changes a pretraining setting
    (the others fine-tune the headline's base; finetune_from=scratch needs none)."""
    return settings.finetune_from == "base" and (not settings.arm or settings.own_base)


def evaluated_already(settings: QualitySettings) -> bool:
    """An evaluation newer than the fine-tuning, at the same stop thresholds and rule (else evaluate again;
    a fixed-length run has neither, so changing them leaves it done)."""
    results = settings.arm_root / "results.json"
    trained = settings.stage_dir("finetune") / "stage.json"
    if not (results.is_file() and trained.is_file() and results.stat().st_mtime > trained.stat().st_mtime):
        return False
    if settings.compression.get("compression_mode") != "variable":
        return True
    done = json.loads(results.read_text())["settings"]
    same_thresholds = list(done.get("eval_stop_thresholds", [])) == list(settings.eval_stop_thresholds)
    return same_thresholds and done.get("eval_stop_rule") == settings.eval_stop_rule


def without_parallel(argv: list[str]) -> list[str]:
    """argv less its `--parallel [N]` (the children of run_parallel each run one run)."""
    kept, skip_count = [], False
    for a in argv:
        if skip_count:
            skip_count = False
            if a.isdigit():
                continue
        if a == "--parallel":
            skip_count = True
        elif not a.startswith("--parallel="):
            kept.append(a)
    return kept


def run_parallel(runs: list[QualitySettings], stage: str, argv: list[str], at_most: int = 0) -> None:
    """`stage` for every run, one process each (`--only NAME`) sharing the device, so arms get the same
    wall-clock budget side by side; at most `at_most` at once (0: all), the next starting as one ends. Each
    process writes <run dir>/<stage>.log."""
    import subprocess

    from acomp.train.distributed import RANK_VARIABLES

    command = [sys.executable, str(Path(__file__).resolve()), *without_parallel(argv)]
    if stage == "eval":
        command.append("--shared-device")  # the parent times each decode alone afterwards
    # This process's own one-rank group (from pretraining) set them; each child makes its own, on a free port.
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    at_most = min(at_most or len(runs), len(runs))
    logs = ", ".join(str(run.arm_root / f"{stage}.log") for run in runs)
    limit = "at once" if at_most == len(runs) else f"{at_most} at a time"
    print(f"{stage}: {len(runs)} runs {limit}; logs: {logs}", flush=True)
    waiting, running, failed = list(runs), [], []
    while waiting or running:
        while waiting and len(running) < at_most:
            run = waiting.pop(0)
            run.arm_root.mkdir(parents=True, exist_ok=True)
            log = run.arm_root / f"{stage}.log"
            with open(log, "w") as f:
                child = subprocess.Popen(
                    [*command, "--stage", stage, "--only", run.name],
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            running.append((run.name, log, child))
        time.sleep(0.5)
        for name, log, child in [r for r in running if r[2].poll() is not None]:
            running.remove((name, log, child))
            if child.returncode != 0:
                failed.append(f"{name} (exit {child.returncode}, see {log})")
                continue
            lines = [
                line
                for line in log.read_text().splitlines()
                if line.startswith(f"{stage}:") or "wrote" in line
            ]
            print(f"{name}: {lines[-1] if lines else 'done'}", flush=True)
    if failed:
        raise SystemExit(f"{stage} failed for {', '.join(failed)}")


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="stage to run (default: all)")
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget of the chosen stage (not with --stage all)",
    )
    p.add_argument(
        "--pretrain-minutes",
        type=float,
        default=None,
        help="pretrain budget, corpus build included (default 8.3; smoke 0.3)",
    )
    p.add_argument(
        "--finetune-minutes", type=float, default=None, help="fine-tuning budget (default 9.2; smoke 0.3)"
    )
    p.add_argument(
        "--eval-minutes", type=float, default=None, help="evaluation budget (default 2.0; smoke 0.5)"
    )
    p.add_argument(
        "--eval-blocks", type=int, default=None, help="held-out blocks to evaluate (default 512; smoke 8)"
    )
    p.add_argument(
        "--out", default=None, help="working directory (default .bench/quality, smoke .bench/quality-smoke)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny model and corpus on CPU: every stage in under 2 minutes"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting for every run (a QualitySettings field, arch.NAME or compression.NAME; YAML value)",
    )
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="an ablation arm: the stages again with these settings changed (files under <out>/arms/NAME; the "
        "corpus and, unless a pretraining setting changes, the base are shared); writes ablation.md",
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="NAME",
        help="run the stages for one of the runs only (an arm's NAME, or 'headline'): several processes, one "
        "per run, can then share a GPU; the last eval without --only writes ablation.md",
    )
    p.add_argument(
        "--parallel",
        nargs="?",
        const=0,
        default=None,
        type=int,
        metavar="N",
        help="fine-tune and evaluate the headline run and its arms side by side, one process each on the "
        "same GPU (logs: <run dir>/<stage>.log), and pretrain the bases of arms that change a pretraining "
        "setting beside the headline's; N: at most N processes at a time, the next starting as one ends "
        "(default: all at once; an H200 holds about four 115M runs, an 80 GB H100 two or three; done runs "
        "are skipped)",
    )
    p.add_argument("--force", action="store_true", help="redo the chosen stages even when they are done")
    p.add_argument(
        "--shared-device",
        action="store_true",
        help="eval: other processes use the GPU too (--parallel's own processes), so the summary profile's "
        "decode is not timed; an eval without it times each run's decode alone",
    )
    args = p.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    settings = QualitySettings.tiny() if args.smoke else QualitySettings()
    try:
        settings = settings.changed(parse_changes(args.set, "--set"))
    except ValueError as e:
        p.error(str(e))
    if args.out:
        settings.out = args.out
    if args.eval_blocks is not None:
        settings.eval_blocks = args.eval_blocks
    for stage in ("pretrain", "finetune", "eval"):
        value = getattr(args, f"{stage}_minutes")
        if value is not None:
            setattr(settings, f"{stage}_minutes", value)
    if args.minutes is not None:
        if args.stage in ("all", "data"):
            p.error(
                "--minutes sets the budget of one training or eval stage; with --stage all use --pretrain-minutes etc."
            )
        setattr(settings, f"{args.stage}_minutes", args.minutes)
    try:
        settings.check()
    except ValueError as e:
        p.error(str(e))
    runs = [settings]
    for spec in args.arm:
        name, _, items = spec.partition(":")
        try:
            runs.append(settings.changed(parse_changes(items.split(","), f"--arm {name}"), arm=name))
        except ValueError as e:
            p.error(str(e))
    if len({run.arm for run in runs}) < len(runs):
        p.error("two --arm options have the same name")
    if args.parallel is not None and args.parallel < 0:
        p.error(f"--parallel {args.parallel}: give N >= 1 processes at a time, or no N for all at once")
    if args.parallel is not None and args.only is not None:
        p.error("--parallel runs every run, one process each; --only picks one: give one of them")
    selected = runs
    if args.only is not None:
        selected = [run for run in runs if run.name == args.only]
        if not selected:
            names = ", ".join(run.name for run in runs)
            p.error(f"--only {args.only}: no such run (runs: {names})")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        p.error("the full benchmark needs a GPU; use --smoke on a CPU machine")
    settings.root.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "data":
            if args.stage == "data":
                stage_data(settings)
            continue
        todo = [run for run in selected if pretrains(run)] if stage == "pretrain" else selected
        parallel = args.parallel is not None and args.parallel != 1 and len(todo) > 1
        if parallel:
            if not (settings.stage_dir("corpus") / "manifest.json").is_file():
                stage_data(settings)  # once, before the processes that read it
            run_parallel(todo, stage, argv if argv is not None else sys.argv[1:], args.parallel)
        for run in () if parallel else todo:
            if stage in ("pretrain", "finetune"):
                stage_train(run, stage, getattr(run, f"{stage}_minutes"), args.force)
            elif evaluated_already(run) and not args.force:
                print(f"eval: done already ({run.arm_root / 'results.json'}); --force to redo", flush=True)
            else:
                summarize(run, stage_eval(run, run.eval_minutes, not args.shared_device), command)
        if stage == "eval" and not args.shared_device:
            for run in selected:
                time_decode_alone(run)
        if stage == "eval" and (len(runs) > 1 or settings.eval_stop_thresholds) and args.only is None:
            write_ablation(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
