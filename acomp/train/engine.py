"""Model + DeepSpeed engine: build the AutoCompressor (fresh or pretrained, ZeRO-3 aware), add LoRA, wrap.

Order matters under ZeRO-3: the model is loaded partitioned (zero.Init through transformers' HfDeepSpeedConfig),
the summary table is initialised from the EOS row on gathered parameters, LoRA is added (peft copies the
summary table for `modules_to_save` under gathered parameters too), then the optimizer and the engine.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from acomp.config import ConfigError, RunConfig
from acomp.modeling.config import config_fields
from acomp.train.checkpointing import configured
from acomp.train.distributed import Dist
from acomp.train.optim import build_optimizer, build_scheduler

# Keeps transformers' HfDeepSpeedConfig alive: while it exists, from_pretrained partitions weights as it loads.
_HF_DS_CONFIG = None


@dataclass
class BatchPlan:
    """How one optimizer step's global batch is spread over ranks, micro-batches and substeps."""

    micro_batch_size: int
    accumulation: int  # micro-batches per rank per step
    substeps: int  # BPTT windows per micro-batch; each is one DeepSpeed micro-step

    @property
    def ds_accumulation(self) -> int:
        return self.accumulation * self.substeps


def plan_batches(cfg: RunConfig, world_size: int) -> BatchPlan:
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x {world_size} ranks"
        )
    return BatchPlan(t.micro_batch_size, t.global_batch_size // per_step, cfg.compression.training_substeps)


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    if cfg.train.precision == "auto":
        return device.type == "cuda"
    return cfg.train.precision == "bf16"


# Elements: the smallest reduce/prefetch bucket "auto" resolves to under ZeRO-3 (about one Llama-1B layer).
ZERO3_BUCKET = 5 * 10**7


def resolve_ds_config(
    cfg: RunConfig, plan: BatchPlan, world_size: int, device: torch.device, hidden_size: int
) -> dict:
    """Read the DeepSpeed JSON and fill its "auto" values from the run config.

    Every substep is one DeepSpeed micro-step (one backward), so DeepSpeed's gradient_accumulation_steps
    is micro-batches x substeps and its loss scaling averages over both; train_batch_size is therefore
    counted in substeps, not sequences. A value the JSON sets explicitly must agree with the run config.
    """
    path = Path(cfg.train.deepspeed)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed={str(path)!r}: no such DeepSpeed config file")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed={str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed={str(path)!r}: expected a JSON object, got {type(ds).__name__}")
    bf16 = use_bf16(cfg, device)
    wanted = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.ds_accumulation,
        "train_batch_size": plan.micro_batch_size * plan.ds_accumulation * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in wanted.items():
        _fill(ds, key, value, where=f"{path}:{key}")
    ds.setdefault("bf16", {})
    _fill(ds["bf16"], "enabled", bf16, where=f"{path}:bf16.enabled (train.precision={cfg.train.precision})")
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: fp16 is not supported (use bf16 or fp32)")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    # Persistent parameters stay gathered between uses. On one rank partitioning saves nothing (the partition
    # is the whole tensor) and re-gathering every module costs a copy and a hook round-trip, so there every
    # parameter persists; over ranks HF's rule (10 d).
    # Buckets: HF's d^2 rule cuts Llama-1B's gradients into ~250 small buckets, so reduce buckets hold at least
    # 5e7 elements, and over ranks 5e7 parameters are prefetched (about one layer ahead with whole-layer
    # fetches, mark_layers_as_zero3_units). Prefetch stays at 0.9 d^2 on one rank, where nothing is gathered
    # and a large prefetch only costs memory (docs/PERFORMANCE.md).
    persistence = 10 * hidden_size if world_size > 1 else 2**62
    prefetch = int(0.9 * hidden_size * hidden_size)
    if world_size > 1:
        prefetch = max(ZERO3_BUCKET, prefetch)
    # DeepSpeed's "memory-efficient linear" replaces torch.nn.functional.linear process-wide with an autograd
    # function that reads each weight's ZeRO id; compiled layers then guard on that id and recompile for every
    # layer. Whole-layer fetches (zero3_whole_layers) already gather the weights for backward.
    if zero.get("stage") == 3:
        zero.setdefault("memory_efficient_linear", False)
    for key, value in {
        "reduce_bucket_size": max(ZERO3_BUCKET, hidden_size * hidden_size),
        "stage3_prefetch_bucket_size": prefetch,
        "stage3_param_persistence_threshold": persistence,
    }.items():
        if zero.get(key) == "auto":
            zero[key] = value
    ds.setdefault("steps_per_print", 10**9)  # we print our own metrics
    ds.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: cannot resolve 'auto' for {', '.join(leftover)}")
    return ds


def _fill(section: dict, key: str, value, where: str) -> None:
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(f'{where} is {current!r} but the run config implies {value!r}; set it to "auto"')


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads(ds_config: dict, what: str) -> bool:
    """Whether ZeRO offloads `what` ("optimizer" or "param") to CPU or NVMe."""
    device = ds_config.get("zero_optimization", {}).get(f"offload_{what}", {}).get("device", "none")
    return device in ("cpu", "nvme")


def grad_reduction_plan(cfg: RunConfig, ds_config: dict) -> tuple[bool, str]:
    """Whether a step's gradients are reduced once (`train.coalesce_grad_reduction`), and if the option is on
    but cannot apply, why. DeepSpeed coalesces under ZeRO 1-3 only, and not with bf16 weights accumulating
    fp32 gradients at stage 1 (its BF16_Optimizer); under CPU/NVMe offload the reduction per backward moves
    each gradient off the GPU, which coalescing would keep there until the step's end."""
    if not cfg.train.coalesce_grad_reduction:
        return False, ""
    stage = zero_stage(ds_config)
    accum = str(ds_config.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    bf16 = ds_config.get("bf16", {}).get("enabled") is True
    if stage == 0:
        why = "ZeRO stage 0"
    elif offloads(ds_config, "optimizer") or offloads(ds_config, "param"):
        why = "ZeRO offload keeps gradients off the GPU"
    elif stage == 1 and bf16 and accum in ("fp32", "float32", "float"):
        why = "bf16 with fp32 gradient accumulation at ZeRO stage 1"
    else:
        return True, ""
    return (
        False,
        f"train.coalesce_grad_reduction: not applied ({why}); gradients are reduced after each backward",
    )


# ----------------------------------------------------------------------------------------------- model
def base_model_config(cfg: RunConfig, tokenizer):
    """The transformers config of the model to train (before compression fields are added)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    m = cfg.model
    if m.name_or_path is not None:
        return AutoConfig.from_pretrained(m.name_or_path)
    arch = dict(m.arch)
    arch.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            arch.setdefault(name, token_id)
    try:
        return CONFIG_MAPPING[m.family](**arch)
    except (TypeError, ValueError, KeyError) as e:  # a key it refuses, or a value its own checks refuse
        raise ConfigError(f"model.arch does not fit a {m.family} config: {e}") from None


def build_model(
    cfg: RunConfig,
    tokenizer,
    ds_config: dict,
    dtype: torch.dtype,
    corpus_vocab: int | None = None,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """The AutoCompressor to train, its summary table initialised, LoRA added if configured.

    When the corpus tokenizer has more tokens than the model (the <sum>/<eoc> control tokens added at
    corpus-build time), the embeddings are resized (new rows = mean of the old, gathered under ZeRO-3 by
    transformers) and, under LoRA, those rows stay trainable through peft's trainable_token_indices."""
    global _HF_DS_CONFIG
    from acomp.modeling import AutoCompressorModel

    fields = {**config_fields(cfg.compression), **config_fields(cfg.model)}
    fields["sdpa_backend"] = training_sdpa_backend(cfg)
    # "auto" trains its first two steps with checkpointing on; acomp.train.checkpointing decides after them
    fields["segment_gradient_checkpointing"] = configured(cfg)
    if cfg.model.name_or_path is None:
        # Built whole on every rank from the same seed, so all ranks (and any world size) start identical;
        # deepspeed.initialize partitions it. On a GPU it is initialised there (a host init of billions of
        # parameters takes minutes).
        config = base_model_config(cfg, tokenizer)
        config._attn_implementation = cfg.model.attn_implementation
        if cfg.compression.compression_mode == "variable":
            config.update(control_token_ids(tokenizer))
        torch.manual_seed(cfg.train.seed)
        on_gpu = device is not None and device.type == "cuda"
        with torch.device(device) if on_gpu else contextlib.nullcontext():
            model = AutoCompressorModel.from_config(config, **fields)  # fp32; DeepSpeed casts for bf16
        missing_summary = True
    else:
        if zero_stage(ds_config) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)  # from_pretrained now loads straight into partitions
        elif _HF_DS_CONFIG is not None:
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            _HF_DS_CONFIG = None
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model.name_or_path)
        if cfg.compression.compression_mode == "variable" and getattr(config, "sum_token_id", None) is None:
            config.update(control_token_ids(tokenizer))  # rows come from resize_for_corpus below
        model, info = AutoCompressorModel.from_pretrained(
            cfg.model.name_or_path,
            config=config,
            dtype=dtype,
            attn_implementation=cfg.model.attn_implementation,
            output_loading_info=True,
            **fields,
        )
        missing_summary = "embed_summary.weight" in info["missing_keys"]
    policy = cfg.model.init_summary
    new_summary = policy == "always" or (policy == "auto" and missing_summary)
    if new_summary:
        model.init_summary_embeddings()  # gathers ZeRO-3 partitions itself
    new_tokens = resize_for_corpus(model, corpus_vocab)
    if new_summary and model.variable_length:
        model.init_stop_row()  # after the resize, which gives new rows the mean row
    if cfg.lora.enabled:
        model = add_lora(model, cfg, lora_token_rows(model, new_tokens))
    # peft creates its weights in fp32; ZeRO-3 needs one dtype across parameters (partitioned ones already are).
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)
    return model


def training_sdpa_backend(cfg: RunConfig) -> str:
    """`model.sdpa_backend` for training. `auto` with random segment boundaries is flash: cudnn (auto's
    choice on Hopper) builds a plan for every new sequence length, and random boundaries make new lengths all
    the time (benchmarks/RESULTS.md). The exported config keeps the
    configured value."""
    if cfg.model.sdpa_backend == "auto" and cfg.compression.randomize_segments:
        return "flash"
    return cfg.model.sdpa_backend


def compiles_layers(cfg: RunConfig, device: torch.device | None) -> bool:
    """`model.compile_layers`, where null means: compile on GPUs (where it wins), not on CPU (tests, the demo:
    compilation would cost more than it saves)."""
    if cfg.model.compile_layers is None:
        return device is not None and device.type == "cuda"
    return cfg.model.compile_layers


def compile_length_plan(cfg: RunConfig, model: torch.nn.Module) -> tuple[str, str]:
    """The compiled layers' sequence length (`compile_decoder_layers`) and, where the plan differs from what the
    config asks, why. Fixed boundaries compile a graph per distinct length, unless the graphs a run needs pass
    torch's `recompile_limit`, past which torch runs new shapes eager: one per training length, and with
    `train.eval_every` one without gradients per length the held-out loss runs (the training lengths and the
    last segment alone; in variable mode its compacted summaries add lengths no count can foresee, which may run
    eager). An unbacked length needs `causal_attention`: SDPA with no attention mask, which the trainer's
    unpadded segments get in fixed-length mode and with variable mode's presence bias folded."""
    from acomp.modeling.attention import folds_presence
    from acomp.train.segments import fixed_forward_lengths

    fixed = ""
    if not cfg.compression.randomize_segments:
        lengths = len(fixed_forward_lengths(cfg.compression))
        graphs = lengths + (lengths + 1 if cfg.train.eval_every else 0)
        dynamo = torch._dynamo.config
        limit = getattr(dynamo, "recompile_limit", None) or dynamo.cache_size_limit  # older torch: the latter
        if graphs <= limit:
            return "static", ""
        held_out = " with the held-out loss's" if cfg.train.eval_every else ""
        fixed = (
            f"compiled layers: fixed segment boundaries give {lengths} decoder lengths, {graphs} graphs{held_out}, "
            f"past torch's recompile_limit ({limit}), beyond which it runs new shapes eager; "
        )
    if cfg.model.compile_length != "unbacked":
        return cfg.model.compile_length, f"{fixed}the length is {cfg.model.compile_length}" if fixed else ""
    base = unwrap(model)
    if base.config._attn_implementation != "sdpa":
        why = f"attn_implementation {base.config._attn_implementation!r}"
    elif base.variable_length and not folds_presence(base.config):
        why = "variable mode's presence mask (model.presence_attention: mask)"
    else:
        return "unbacked", f"{fixed}the length is unbacked" if fixed else ""
    return (
        "dynamic",
        f"{fixed}model.compile_length: unbacked needs SDPA without a mask, not {why}; the length is dynamic",
    )


def compile_decoder_layers(model: torch.nn.Module, length: str = "static") -> None:
    """torch.compile every decoder layer's forward in place (regional compilation: one graph, reused by all
    layers; the segment loop, the loss and the module hooks around each layer stay eager).

    Only `forward` is compiled, not the module call: DeepSpeed's ZeRO-3 hooks gather a layer's weights before
    it and release them after it, outside the graph, so the graph always sees whole weights and never
    recompiles for them. `length`: "static" compiles once per distinct length (fixed boundaries); with random
    boundaries (new lengths every step) "dynamic" makes it a symbolic size, "unbacked" an unbacked one
    (`symbolic_sequence_length`). Only the length is symbolic: torch.compile(dynamic=True) also turned the
    layers' float attributes (the norms' epsilon) into graph inputs, 0-dim CPU tensors for which inductor
    compiled C++ kernels: the slowest part of the first step's compilation."""
    config = unwrap(model).config
    skip_mix_order_size_checks(length == "dynamic")
    for layer in unwrap(model).get_decoder().layers:
        if length == "static":
            layer.forward = torch.compile(layer.forward, dynamic=False)
        elif length == "dynamic":
            layer.forward = symbolic_sequence_length(torch.compile(layer.forward), config, unbacked=False)
        else:
            compiled = torch.compile(layer.forward, dynamic=False, options=UNBACKED_LENGTH_OPTIONS)
            layer.forward = symbolic_sequence_length(compiled, config, unbacked=True)


def skip_mix_order_size_checks(skip: bool) -> None:
    """Inductor's mix-order reductions (a norm's backward reductions over rows and over columns, fused) check
    size thresholds on the length (rows >= 4,096, rows x columns >= 5 x 2^20) and guard on the answers, so with
    random boundaries every threshold a segment first crossed recompiled the layers, late in a run too, and the
    first step took longer to compile. Non-strict mode skips the checks (the fusion applies at every length).
    Process-wide, read when a graph compiles (at its first call): set for the model being compiled, so a later
    model of the same process compiles with its own. Passed as torch.compile's `options` instead, it left the
    first step as slow as without it (benchmarks/RESULTS.md). A torch without the setting is left alone."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config.triton, "mix_order_reduction_non_strict_mode"):
        inductor_config.triton.mix_order_reduction_non_strict_mode = skip


# Mix-order reduction (fusing, e.g., a norm's backward reductions over rows and over columns) needs a concrete
# length to pick its split size, which an unbacked length lacks (inductor fails).
UNBACKED_LENGTH_OPTIONS = {"triton.mix_order_reduction": False}

# The layer inputs that carry the sequence dimension besides hidden_states [B, T, D], and where it is in them.
_SEQUENCE_DIMS = {
    "position_embeddings": (1,),  # RoPE's (cos, sin), each [B, T, head_dim]
    "position_ids": (-1,),
    "cache_position": (0,),
    "attention_mask": (-2, -1),  # [B, 1, T, T] where one is passed
    "key_bias": (-1,),  # causal_attention's [B, T]
}


def symbolic_sequence_length(forward, config, unbacked: bool):
    """`forward` (a compiled decoder layer) with its inputs' sequence dimension marked at each call: unbacked
    where asked and attention takes no mask (`causal_attention`, the trainer's unpadded segments), dynamic
    (backed) otherwise; every other size stays static until it changes (torch's automatic dynamic shapes).

    With a dynamic (backed) size, inductor still specialises on the length where its choices depend on it (the
    8-alignment of the attention's inputs, size thresholds of fusions) and guards on them: random boundaries
    compile a new graph for each combination met, a few in the first steps and more later. An unbacked size
    allows no guards, so one graph serves every length; it needs attention that never reads the length
    (transformers' SDPA attention reads it to choose is_causal, a graph break)."""
    from torch._dynamo import maybe_mark_dynamic
    from torch._dynamo.decorators import mark_unbacked

    from acomp.modeling.attention import CAUSAL

    hint = []  # the first call's length: inductor's size hint (autotuning), fixed for the run

    def mark_unbacked_length(tensor, dim):  # one symbol for every input's sequence dimension
        mark_unbacked(tensor, dim, shape_id="sequence", hint_override=hint[0])

    def call(hidden_states, *args, **kwargs):
        # read at each call: the compressor sets `causal_attention` around its decoder calls only
        mark = (
            mark_unbacked_length if unbacked and config._attn_implementation == CAUSAL else maybe_mark_dynamic
        )
        length = hidden_states.shape[1]
        hint[:] = hint or [length]
        mark(hidden_states, 1)
        for name, dims in _SEQUENCE_DIMS.items():
            value = kwargs.get(name)
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if not isinstance(tensor, torch.Tensor):
                    continue
                for dim in dims:
                    if -tensor.dim() <= dim < tensor.dim() and tensor.shape[dim] == length:
                        mark(tensor, dim % tensor.dim())
        return forward(hidden_states, *args, **kwargs)

    return call


def control_token_ids(tokenizer) -> dict:
    """{"sum_token_id", "eoc_token_id"} from the corpus tokenizer (preprocess adds <sum>/<eoc>), so the
    model's control rows are the tokenizer's; {} when it lacks them (the model then appends its own rows)."""
    from acomp.data import EOC_TOKEN, SUM_TOKEN

    vocab = tokenizer.get_vocab()
    if SUM_TOKEN in vocab and EOC_TOKEN in vocab:
        return {"sum_token_id": vocab[SUM_TOKEN], "eoc_token_id": vocab[EOC_TOKEN]}
    return {}


def resize_for_corpus(model: torch.nn.Module, corpus_vocab: int | None) -> list[int]:
    """Grow the token embeddings (and an untied LM head) to the corpus vocabulary; returns the new ids."""
    old = model.get_input_embeddings().num_embeddings
    if corpus_vocab is None or corpus_vocab <= old:
        return []
    model.resize_token_embeddings(corpus_vocab, mean_resizing=True)
    return list(range(old, corpus_vocab))


def lora_token_rows(model: torch.nn.Module, new_tokens: list[int]) -> list[int]:
    """The token rows that stay fully trainable under LoRA: those of tokens new to the base model and, in
    variable mode, `<sum>` and `<eoc>`, whose rows are the mode's own parameters (the stop probability is read
    from the `<eoc>` row, which a new summary table starts at zero)."""
    rows = set(new_tokens)
    if getattr(model, "variable_length", False):
        rows |= {model.config.sum_token_id, model.config.eoc_token_id}
    return sorted(rows)


def add_lora(model: torch.nn.Module, cfg: RunConfig, token_rows: list[int] = ()) -> torch.nn.Module:
    """peft LoRA on the attention projections; `modules_to_save` (the summary table) and `token_rows`
    (lora_token_rows) stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    lcfg = cfg.lora
    trainable_tokens = None
    if token_rows:
        params = model.get_input_embeddings().parameters()
        if any(hasattr(p, "ds_id") for p in params) and not torch.cuda.is_available():
            raise ConfigError(
                f"keeping {len(token_rows)} token rows trainable under LoRA (tokens the corpus adds to the model, "
                "the variable mode's <sum>/<eoc>) with ZeRO-3 needs CUDA (peft gathers them on the GPU): use "
                "ZeRO-1/2 on CPU"
            )
        trainable_tokens = {"embed_tokens": list(token_rows)}
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            trainable_tokens["lm_head"] = list(token_rows)
    config = LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=list(lcfg.target_modules),
        modules_to_save=list(lcfg.modules_to_save),
        trainable_token_indices=trainable_tokens,
        bias="none",
    )
    model = get_peft_model(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in lcfg.modules_to_save:
        if not any(f"{name}.modules_to_save." in n for n in trainable):
            raise ConfigError(f"lora.modules_to_save: {name!r} matched no module of the model")
    return model


def build_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: dict, dist: Dist):
    """deepspeed.initialize with our AdamW and warmup/decay schedule (stepped by the engine)."""
    import deepspeed

    # DeepSpeed's collectives use torch names deprecated since 2.x; under ZeRO-3 the FutureWarning would repeat
    # several times a step (something resets the warning registry between steps).
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    if zero_stage(ds_config) == 3:
        cap_zero3_reduce_bucket(model, ds_config)
        if cfg.train.zero3_whole_layers:
            mark_layers_as_zero3_units(model)
    optimizer = build_optimizer(model, cfg.optim, cpu_offload=offloads(ds_config, "optimizer"))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine


def cap_zero3_reduce_bucket(model: torch.nn.Module, ds_config: dict) -> None:
    """Keep ZeRO-3's gradient bucket below half the trainable parameters (less the largest one).

    Every segment's backward produces a gradient for the same weights, and ZeRO-3 queues a weight each time.
    Its bucket must be flushed between two of them (it asserts a weight is in a bucket once), which holds when
    the bucket is no larger than the other weights' gradients in between: all trainable weights but the one.
    Small models, and LoRA runs (few trainable weights), would otherwise hit that assertion."""
    sizes = [getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad]
    limit = max(1, (sum(sizes) - max(sizes, default=0)) // 2)
    zero = ds_config["zero_optimization"]
    zero["reduce_bucket_size"] = min(int(zero.get("reduce_bucket_size", 5 * 10**8)), limit)


def mark_layers_as_zero3_units(model: torch.nn.Module) -> None:
    """Make every decoder layer a ZeRO-3 leaf module: its weights are gathered together by one hook pair on
    the layer, not by one per linear, so a layer costs one fetch instead of ~9 small ones. Only the layers:
    DeepSpeed's size-based `stage3_module_granularity_threshold` also makes a whole small model one leaf,
    whose weights are released before the chunked loss recomputes the LM head in backward."""
    from deepspeed.utils import set_z3_leaf_modules

    layers = unwrap(model).get_decoder().layers
    set_z3_leaf_modules(model, list({type(layer) for layer in layers}))


def fix_loss_chunks(
    model: torch.nn.Module, cfg: RunConfig, ds_config: dict, block_size: int, max_segment: int
) -> None:
    """Under ZeRO-3, every segment of the run slices its loss as its longest possible segment must
    (ChunkedNLL.chunks): the LM head is then called equally often whatever the boundaries and the rank, as
    ZeRO-3's trace and collective gathers need. Other stages keep the fewest slices each segment needs."""
    from acomp.modeling.compressor import loss_slices
    from acomp.train.segments import longest_segment

    size = cfg.model.loss_chunk_size
    if zero_stage(ds_config) != 3 or size <= 0:
        return
    longest = longest_segment(cfg.compression, block_size, max_segment)
    unwrap(model).chunked_loss.chunks = loss_slices(size, cfg.train.micro_batch_size, longest)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The AutoCompressor inside a DeepSpeed engine and/or a peft wrapper."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def flop_params(model: torch.nn.Module) -> int:
    """Parameters that cost 2 FLOPs per token in the forward: everything but input embedding tables,
    plus the LM head when it is tied to the input embeddings (N of the 6N-per-token convention)."""
    return sum(flop_param_split(model))


def flop_param_split(model: torch.nn.Module) -> tuple[int, int]:
    """`flop_params` split into (trainable, frozen): frozen weights (a LoRA base) need no weight gradient,
    so they cost 4 FLOPs per token in training instead of 6 (acomp.train.metrics)."""
    base = unwrap(model)
    inputs = base.get_input_embeddings()
    skip = {id(p) for p in inputs.parameters()}
    skip |= {id(p) for n, p in base.named_parameters() if "embed_positions" in n or "embed_summary" in n}
    counts = [0, 0]
    for p in model.parameters():
        if id(p) not in skip:
            counts[not p.requires_grad] += getattr(p, "ds_numel", p.numel())
    head = base.get_output_embeddings()
    if head is not None and head.weight is inputs.weight:
        counts[not head.weight.requires_grad] += getattr(head.weight, "ds_numel", head.weight.numel())
    return counts[0], counts[1]


@contextlib.contextmanager
def zero3_module_stack_restored():
    """Leave DeepSpeed ZeRO-3's stack of running modules as the block found it.

    ZeRO-3 pushes a module on a global stack before its forward and pops it after. A checkpointed segment's
    recompute in backward stops as soon as its saved tensors are back (torch's non-reentrant early stop), which
    is inside the chunked loss's forward: that module is pushed and never popped, one stale entry per
    recomputed segment, growing for the whole run, and the top entry is where DeepSpeed registers parameters
    used outside their own module. Outside ZeRO-3 the stack does not change."""
    from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK as stack

    depth = len(stack)
    try:
        yield
    finally:
        del stack[depth:]
