"""One run configuration: YAML file -> dataclasses -> model, data, loop.

`load_config("configs/tiny.yaml", ["train.max_steps=20"])` reads the YAML, applies dotted overrides and
checks every key and type, so a typo or a wrong type fails before any model is built, with the key named.
`save_config(cfg, path)` writes the resolved config back as YAML (the run keeps it beside its outputs).
Every key, its default and meaning are listed in docs/TRAINING.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from acomp.modeling.config import CompressionFields, KernelFields


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an invalid value; the message names the key."""


@dataclass
class ModelConfig(KernelFields):
    """The base model, its attention and speed settings (`sdpa_backend`, `loss_chunk_size`: KernelFields)."""

    # HF directory or hub name of the base model (or of an AutoCompressor to keep training); null = build a
    # fresh, randomly initialised model of `family` from `arch` (tests, the tiny demo).
    name_or_path: str | None = None
    family: str = "llama"  # fresh init only: a key of acomp.modeling.MODEL_CLASSES
    arch: dict = field(default_factory=dict)  # fresh init only: transformers config kwargs (hidden_size, ...)
    attn_implementation: str = "sdpa"  # passed to transformers: sdpa | eager | flash_attention_2
    # When to initialise the summary table after loading (how: compression.summary_init): "auto" = only when
    # the loaded checkpoint has no `embed_summary.weight` (a base model), "always", "never".
    init_summary: str = "auto"
    # torch.compile each decoder layer (regional compilation; the sequence dimension is dynamic when segment
    # boundaries are random), with every ZeRO stage; null = on GPUs, not on CPU (docs/PERFORMANCE.md).
    compile_layers: bool | None = None
    # How compiled layers see a random boundary's length: "dynamic" (a symbolic size; inductor still specialises
    # on its 8-alignment) or "unbacked" (one graph for every length; runs slower: docs/TRAINING.md).
    compile_length: str = "dynamic"


@dataclass
class CompressionConfig(CompressionFields):
    """The model's compression fields (CompressionFields: summary_length, ...) plus how the trainer cuts
    blocks into BPTT substeps and segments (acomp.train.segments)."""

    # true | false | auto: on for the first two steps, then off where the activations fit, as the second step's
    # memory says (acomp.train.checkpointing; on CPU auto stays on). The model's config records true or false.
    segment_gradient_checkpointing: bool | str = True
    training_substeps: int = 2  # BPTT windows per sequence; the softprompt is detached between them
    segments_per_substep: int = 2  # segments inside one window; gradients flow through their summaries
    randomize_segments: bool = True  # draw segment boundaries per substep (paper) instead of segment_lengths
    segment_lengths: list[int] = field(default_factory=list)  # fixed mode: the segments of one substep
    # Longest segment allowed in randomized mode; null = derived from the model's position budget
    # (see acomp.train.segments.segment_position_budget).
    max_segment_length: int | None = None
    # Randomized mode: boundaries on multiples of this many tokens (1 = the paper's token granularity).
    segment_multiple: int = 1
    # Variable mode: the length penalty's weight ramps linearly from compression_lambda / N at step 1 to
    # compression_lambda at step N (0 = full weight from the start), so summaries gain value before they are
    # priced: a penalty on summaries the model cannot use yet drops them, and a dropped vector gets little
    # gradient.
    lambda_warmup_steps: int = 0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] = field(default_factory=lambda: ["embed_summary"])


@dataclass
class DataConfig:
    path: str = "data/stdlib"  # a corpus dir built by preprocess/, or a remote one: s3://bucket/prefix
    # When `path` holds no corpus yet, rank 0 builds one with acomp.data.build_corpus(out=path, **this),
    # e.g. {source: stdlib, train_tokenizer_vocab: 2048, block_size: 512}; {} = never build (error instead).
    build_if_missing: dict = field(default_factory=dict)
    shuffle: bool = True
    num_workers: int = 0
    val_split: str = "val"
    # Shard integrity: unless "none", each shard's xxh64 is checked when a process first reads from it (local
    # and remote corpora; a mismatch stops the run naming the file). Up front, "size" (default) also compares
    # a local corpus' shard sizes with index.json before the model is built; "hash" also recomputes every
    # local shard's hash before the first step (reads the whole corpus on every rank first).
    verify: str = "size"
    # Local cache of a remote data.path (s3://...): its manifest, tokenizer and downloaded shards, reused by
    # later runs. null = $TMPDIR/acomp-corpus-cache/<hash of the URI>. Node-local disk; one job at a time.
    cache_dir: str | None = None
    # Block size the run expects; the corpus must have exactly this. null = whatever the corpus has.
    block_size: int | None = None


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 1000
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 1  # sequences per rank per forward; accumulation = global / (micro * world)
    seed: int = 42
    deepspeed: str = "ds_configs/zero2.json"  # DeepSpeed JSON; its "auto" values are filled from this config
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    # ZeRO-3 only: gather each decoder layer's weights in one go (DeepSpeed leaf modules) instead of one
    # all-gather and hook pair per linear: fewer, larger collectives and far fewer hooks per step.
    zero3_whole_layers: bool = True
    # Reduce the gradients once per optimizer step instead of once per backward (substep), through DeepSpeed's
    # coalesce_grad_reduction(): far less per-layer hook work under ZeRO-3. The trainable weights hold their
    # full summed gradients until then (over several ranks ZeRO-2/3 would keep only a shard): false when that
    # memory binds. Left out where DeepSpeed cannot or should not (engine.grad_reduction_plan).
    coalesce_grad_reduction: bool = True
    checkpoint_every: int = 1000  # steps; 0 = only on signal and at the end
    keep_checkpoints: int = 2  # the last K checkpoints are kept
    resume: str = "auto"  # auto (latest checkpoint in output_dir, if any) | never | PATH to a checkpoint dir
    export_final: bool = True  # write <output_dir>/final in HF format at the end
    export_merge_lora: bool = True  # merge LoRA into the exported weights (else export the adapter)
    eval_every: int = 0  # steps; 0 = no periodic evaluation
    eval_blocks: int = 32  # held-out blocks per evaluation
    peak_tflops: float | None = None  # per device, for MFU; null = detect from the GPU name (none on CPU)
    dist_timeout_s: int = 1800  # collective timeout: a dead rank makes the others fail after this long
    # Steps with a non-finite loss are skipped (no update); this many in a row stop the run with an error.
    max_bad_steps: int = 5
    # Exit status of the launcher after a SIGTERM/SIGUSR1 made it checkpoint and stop (slurm/ passes 75).
    preempt_exit_code: int = 0


@dataclass
class LoggingConfig:
    wandb: str = "disabled"  # disabled | offline | online
    project: str = "acomp"
    run_name: str | None = None
    log_every: int = 10  # steps between printed metric lines (metrics.jsonl gets every step)
    progress: bool = True  # tqdm progress bar on rank 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Renamed keys: the old name is still read, with a message saying the new one.
RENAMED_KEYS = {
    "compression.randomize_substeps": "compression.randomize_segments",
    "model.init_summary_from_eos": "model.init_summary",
}

# Removed keys: configs saved before the removal still load when the key holds its old default (it is dropped);
# any other value is refused, saying why the setting went.
REMOVED_KEYS = {
    "model.liger_kernel": (
        False,
        "Liger-kernel's fused layers ran 2.2x slower than the compiled layers they replaced (benchmarks/RESULTS.md)",
    ),
}


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every key that takes one of a few names, read from where each list lives."""
    from acomp.data.dataset import VERIFY_LEVELS
    from acomp.modeling.attention import ATTN_IMPLEMENTATIONS, PRESENCE_ATTENTION
    from acomp.modeling.config import (
        COMPRESSION_MODES,
        SDPA_BACKENDS,
        STOP_RULES,
        SUMMARY_INITS,
        TRAINING_PRESENCE,
    )
    from acomp.modeling.models import MODEL_CLASSES
    from acomp.train.optim import SCHEDULES

    return {
        "model.family": tuple(MODEL_CLASSES),
        "model.attn_implementation": ATTN_IMPLEMENTATIONS,
        "model.sdpa_backend": SDPA_BACKENDS,
        "model.presence_attention": PRESENCE_ATTENTION,
        "model.init_summary": ("auto", "always", "never"),
        "model.compile_length": ("dynamic", "unbacked"),
        "compression.compression_mode": COMPRESSION_MODES,
        "compression.summary_init": SUMMARY_INITS,
        "compression.compress_stop_rule": STOP_RULES,
        "compression.training_presence": TRAINING_PRESENCE,
        "optim.schedule": SCHEDULES,
        "train.precision": ("auto", "bf16", "fp32"),
        "data.verify": tuple(VERIFY_LEVELS),
        "logging.wandb": ("disabled", "offline", "online"),
    }


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) + dotted `key=value` overrides -> a checked RunConfig."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def read_yaml(path: str | Path) -> dict:
    """The config file as a dict of sections; a key given twice in one mapping is an error (YAML readers keep
    the last one silently, so a second `train:` section would drop the first)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (`<<` merges may still override)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first != line:
                raise _DuplicateKey(
                    f"{key!r} is given twice in one mapping (lines {first} and {line}); only the last would "
                    f"be read: merge them into one"
                )
        return super().construct_mapping(node, deep=deep)


def parse_override(item: str) -> tuple[str, Any]:
    """`train.max_steps=20` -> ("train.max_steps", 20); the value is parsed as YAML (so `[1,2]`, `null`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or a section left empty in the YAML file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def config_from_dict(raw: dict) -> RunConfig:
    raw = _without_removed(_renamed(raw))
    cfg = _build(RunConfig, raw, prefix="")
    validate(cfg)
    return cfg


def _renamed(raw: dict) -> dict:
    """`raw` with renamed keys moved to their new names (a message on stderr for each)."""
    for old, new in RENAMED_KEYS.items():
        section, old_name = old.split(".")
        part = raw.get(section)
        if not isinstance(part, dict) or old_name not in part:
            continue
        new_name = new.split(".")[1]
        if new_name in part:
            raise ConfigError(f"config keys {old!r} and {new!r} are the same setting; keep only {new!r}")
        part = dict(part)
        part[new_name] = part.pop(old_name)
        raw = {**raw, section: part}
        print(f"config: {old!r} is now called {new!r}; please rename it", file=sys.stderr)
    return raw


def _without_removed(raw: dict) -> dict:
    """`raw` without removed keys that hold their old default; ConfigError for one set to anything else."""
    for key, (default, why) in REMOVED_KEYS.items():
        section, name = key.split(".")
        part = raw.get(section)
        if not isinstance(part, dict) or name not in part:
            continue
        if part[name] != default:
            raise ConfigError(f"config key {key!r} was removed: {why}; delete it")
        raw = {**raw, section: {k: v for k, v in part.items() if k != name}}
    return raw


def _in_other_sections(key: str) -> list[str]:
    """'section.key' for each section of RunConfig with a setting called `key` (train.log_every -> logging)."""
    sections = typing.get_type_hints(RunConfig)
    return [f"{s}.{key}" for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}: {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = [prefix + c for c in difflib.get_close_matches(str(key), names, n=1)]
            close = _in_other_sections(str(key)) or close
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(raw[name], hint, f"{prefix}{name}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation; accept ints for floats and numeric strings like '1e-3'."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        kinds = [m.group(1) for e in errors if (m := re.search(r" must be (.+?), got ", e))]
        if len(kinds) == len(errors) > 1:  # e.g. bool | str: "must be true or false, or a string"
            raise ConfigError(f"config key {key!r} must be {', or '.join(kinds)}, got {value!r}")
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):  # list[X] or tuple[X, ...]: a YAML list either way
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} must be a list, got {type(value).__name__}: {value!r}")
        items = [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {type(value).__name__}: {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} must be an integer, got {type(value).__name__}: {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {type(value).__name__}: {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. data.path=2024 or run_name=7
        raise ConfigError(f"config key {key!r} must be a string, got {type(value).__name__}: {value!r}")
    return value


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that need no model or data; each error names the offending key and value."""
    for key, allowed in choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}; got {value!r}")
    c, t = cfg.compression, cfg.train
    _positive(
        ("compression.training_substeps", c.training_substeps),
        ("compression.segments_per_substep", c.segments_per_substep),
        ("compression.segment_multiple", c.segment_multiple),
        ("compression.compression_max_len", c.compression_max_len),
        ("compression.compression_alpha", c.compression_alpha),
        ("train.max_steps", t.max_steps),
        ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.eval_blocks", t.eval_blocks),
        ("train.dist_timeout_s", t.dist_timeout_s),
        ("train.max_bad_steps", t.max_bad_steps),
        ("logging.log_every", cfg.logging.log_every),
    )
    _non_negative(
        ("compression.summary_length", c.summary_length),
        ("compression.compression_lambda", c.compression_lambda),
        ("compression.lambda_warmup_steps", c.lambda_warmup_steps),
        ("optim.warmup_steps", cfg.optim.warmup_steps),
        ("optim.grad_clip", cfg.optim.grad_clip),
        ("optim.weight_decay", cfg.optim.weight_decay),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.eval_every", t.eval_every),
        ("data.num_workers", cfg.data.num_workers),
        ("model.loss_chunk_size", cfg.model.loss_chunk_size),
    )
    if cfg.model.compile_length == "unbacked":
        import inspect

        import torch
        from torch._dynamo.decorators import mark_unbacked

        if not {"shape_id", "hint_override"} <= set(inspect.signature(mark_unbacked).parameters):
            raise ConfigError(
                f"config key 'model.compile_length' unbacked needs a newer torch than {torch.__version__} "
                "(mark_unbacked with shape_id); use dynamic"
            )
    if cfg.model.presence_attention == "folded" and cfg.model.attn_implementation != "sdpa":
        raise ConfigError(
            "config key 'model.presence_attention' folded needs model.attn_implementation sdpa, got "
            f"{cfg.model.attn_implementation!r}"
        )
    if c.segment_gradient_checkpointing not in (True, False, "auto"):
        raise ConfigError(
            "config key 'compression.segment_gradient_checkpointing' must be true, false or auto; "
            f"got {c.segment_gradient_checkpointing!r}"
        )
    threshold = c.compress_stop_threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(
            f"config key 'compression.compress_stop_threshold' must be in [0, 1], got {threshold}"
        )
    if not 0 <= t.preempt_exit_code <= 255:
        raise ConfigError(
            f"config key 'train.preempt_exit_code' must be in [0, 255], got {t.preempt_exit_code}"
        )
    if cfg.data.block_size is not None and cfg.data.block_size <= 0:
        raise ConfigError(f"config key 'data.block_size' must be > 0, got {cfg.data.block_size}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must have 2 values, got {cfg.optim.betas}")
    if not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"config key 'optim.betas' must be in [0, 1), got {cfg.optim.betas}")
    if not cfg.optim.eps >= 0.0:
        raise ConfigError(f"config key 'optim.eps' must be >= 0, got {cfg.optim.eps}")
    if not 0 <= t.seed < 2**63:
        raise ConfigError(f"config key 'train.seed' must be in [0, 2**63), got {t.seed}")
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        raise ConfigError(
            f"config key 'train.peak_tflops' must be > 0 (or null: detect), got {t.peak_tflops}"
        )
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"config key 'optim.min_lr_ratio' must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if not c.randomize_segments:
        if not c.segment_lengths:
            raise ConfigError(
                "compression.randomize_segments is false, so compression.segment_lengths is needed"
            )
        if len(c.segment_lengths) != c.segments_per_substep:
            raise ConfigError(
                f"compression.segment_lengths has {len(c.segment_lengths)} entries but "
                f"compression.segments_per_substep is {c.segments_per_substep}"
            )
    if any(n <= 0 for n in c.segment_lengths):
        raise ConfigError(f"compression.segment_lengths must be positive, got {c.segment_lengths}")
    if c.max_segment_length is not None and c.max_segment_length < 2:
        raise ConfigError(f"compression.max_segment_length must be >= 2, got {c.max_segment_length}")
    if cfg.model.name_or_path is None and not cfg.model.arch:
        raise ConfigError(
            "set model.name_or_path (a pretrained model) or model.arch (a fresh model's config)"
        )
    if cfg.model.name_or_path is None:
        check_arch_keys(cfg.model.family, cfg.model.arch)
    if cfg.lora.enabled and cfg.lora.r <= 0:
        raise ConfigError(f"config key 'lora.r' must be > 0, got {cfg.lora.r}")
    if cfg.lora.enabled and not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    if t.micro_batch_size > t.global_batch_size:
        raise ConfigError(
            f"train.micro_batch_size ({t.micro_batch_size}) > train.global_batch_size ({t.global_batch_size})"
        )


def check_arch_keys(family: str, arch: dict) -> None:
    """Every `model.arch` key must be a setting of the family's transformers config class: those classes take
    any keyword and keep it as an attribute, so a misspelt key would be ignored and the model silently get
    the default in its place."""
    import inspect

    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[family]
    known = {p for p in inspect.signature(config_class.__init__).parameters if p not in ("self", "kwargs")}
    known |= set(
        config_class().to_dict()
    )  # PretrainedConfig's own keys (tie_word_embeddings, bos_token_id, ...)
    known |= set(getattr(config_class, "attribute_map", {}))
    for key in arch:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean 'model.arch.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key 'model.arch.{key}': not a setting of {config_class.__name__} "
                f"(model.family={family!r}){hint}"
            )


def _positive(*items: tuple[str, float]) -> None:
    for key, value in items:
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {value}")


def _non_negative(*items: tuple[str, float]) -> None:
    for key, value in items:
        if value < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {value}")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
