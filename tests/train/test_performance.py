"""Performance levers that must not change results (docs/PERFORMANCE.md): the chunked loss, the SDPA
backend in activation-checkpoint recompute, the MFU FLOP count, ZeRO-3 auto values, whole-layer fetches and
bucket cap, compiled layers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_model
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

import acomp.modeling.compressor as compressor
from acomp.config import RunConfig
from acomp.modeling import attention
from acomp.train.engine import (
    BatchPlan,
    cap_zero3_reduce_bucket,
    compile_decoder_layers,
    compile_length_plan,
    fix_loss_chunks,
    flop_param_split,
    grad_reduction_plan,
    mark_layers_as_zero3_units,
    resolve_ds_config,
)
from acomp.train.metrics import FlopModel, attention_width, segment_flops


# ------------------------------------------------------------------------------------------ chunked loss
def loss_and_grads(family, chunk, ckpt, ids, mask, segment_lengths=(5, 6, 4)):
    model = tiny_model(family, loss_chunk_size=chunk, segment_gradient_checkpointing=ckpt).train()
    out = model(
        ids, attention_mask=mask, labels=ids, segment_lengths=list(segment_lengths), return_logits=False
    )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_chunked_loss_equals_unchunked(family, ckpt):
    ids = random_ids(3, 15)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: ignored targets inside a chunk
    mask[2, -3:] = 0
    ref, ref_grads = loss_and_grads(family, 0, ckpt, ids, mask)
    for chunk in (1, 7, 10_000):  # one token per chunk, a chunk boundary inside segments, one chunk
        out, grads = loss_and_grads(family, chunk, ckpt, ids, mask)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.segment_nll, ref.segment_nll, rtol=1e-6, atol=1e-5)
        assert torch.equal(out.segment_tokens, ref.segment_tokens)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_never_materialises_all_logits():
    model = tiny_model("llama", loss_chunk_size=6, segment_gradient_checkpointing=False).train()
    shapes = []
    model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    ids = random_ids(2, 16)
    out = model(ids, labels=ids, segment_lengths=[8, 8], return_logits=False)
    assert shapes and all(s[0] * s[1] <= 6 for s in shapes)  # batch x positions per LM-head call
    n_forward = len(shapes)
    out.loss.backward()
    assert len(shapes) == 2 * n_forward  # each chunk recomputed once in backward: nothing was kept
    # With logits requested they are computed whole, as before.
    shapes.clear()
    assert model(ids, labels=ids, segment_lengths=[8, 8]).logits.shape == (2, 16, model.config.vocab_size)


def test_fixed_chunk_count_calls_the_head_equally_often_for_every_segment_length():
    """`ChunkedNLL.chunks` (the trainer's, for ZeRO-3's trace): segments of 3-9 positions each call the LM
    head 4 times, never over the chunk size, and give the unchunked loss and gradients."""
    ids = random_ids(2, 18)
    ref, ref_grads = loss_and_grads("llama", 0, True, ids, torch.ones_like(ids), [3, 6, 9])
    model = tiny_model("llama", loss_chunk_size=10, segment_gradient_checkpointing=True).train()
    model.chunked_loss.chunks = 4
    calls = []
    model.lm_head.register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    out = model(ids, labels=ids, segment_lengths=[3, 6, 9], return_logits=False)
    assert len(calls) == 3 * 4 and all(s[0] * s[1] <= 10 for s in calls)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "stage, chunk, expected", [(3, 4096, 3), (3, 0, None), (1, 4096, None), (2, 4096, None)]
)
def test_loss_slice_count_is_fixed_under_zero3_only(stage, chunk, expected):
    """The trainer fixes the slices per segment where ZeRO-3 needs it: as many as the longest segment needs
    (Llama-1B's recipe at micro-batch 4: segments up to 3,072 tokens, slices of 1,024 positions: 3)."""
    cfg = RunConfig()
    cfg.compression.randomize_segments = True
    cfg.compression.training_substeps, cfg.compression.segments_per_substep = 2, 2
    cfg.model.loss_chunk_size, cfg.train.micro_batch_size = chunk, 4
    model = tiny_model("llama")
    fix_loss_chunks(model, cfg, {"zero_optimization": {"stage": stage}}, 6144, 3896)
    assert model.chunked_loss.chunks == expected


def test_loss_chunk_size_is_validated():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        tiny_model("llama", loss_chunk_size=-1)


# ------------------------------------------------------------------------ SDPA backend in recompute
def sdpa_state():
    flags = tuple(
        getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
        for name in ("flash", "mem_efficient", "cudnn", "math")
    )
    return flags, tuple(torch._C._get_sdp_priority_order())


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
def test_checkpoint_recompute_runs_under_the_same_sdpa_backend(monkeypatch, backend):
    """Every SDPA call of a checkpointed segment, in the forward and in the backward's recompute, sees the
    configured backend settings (on CPU the context is forced on; torch keeps the flags there too)."""
    outside = sdpa_state()
    monkeypatch.setattr(compressor, "sdpa_context", lambda name, device: attention.backend_context(backend))
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((phase[0], sdpa_state()))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    phase = ["forward"]
    model = tiny_model("llama", segment_gradient_checkpointing=True).train()
    ids = random_ids(2, 12)
    out = model(ids, labels=ids, segment_lengths=[4, 4, 4], return_logits=False)
    phase[0] = "backward"
    out.loss.backward()
    layers = model.config.num_hidden_layers
    assert [p for p, _ in calls].count("forward") == 3 * layers
    assert [p for p, _ in calls].count("backward") == 2 * layers  # the two checkpointed segments re-ran
    with attention.backend_context(backend):
        expected = sdpa_state()
    assert {state for _, state in calls} == {expected}
    assert sdpa_state() == outside  # restored after forward and after backward


def first_eligible(enabled: set, priority: list, eligible: set):
    """torch's select_sdp_backend: the first backend of the priority list that is enabled and can run."""
    for backend in priority:
        if backend in enabled and (backend in eligible or backend == SDPBackend.MATH):
            return backend
    return None


# The cudnn-first order that torch's lazy, once-per-process initialisation installs at the first SDPA call,
# whatever order is in force then (so possibly inside our block, after the block set its own).
CUDNN_FIRST = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
def test_backend_choice_does_not_depend_on_torch_priority_state(backend):
    """Inside our block torch's priority list is either the block's or the cudnn-first one its lazy
    initialisation installed behind the block's back (the flash/efficient CheckpointError: forward under
    one, recompute under the other). The kernel chosen must be the same under both."""
    ours = attention._ORDER[backend] + [SDPBackend.MATH]
    enabled = set(ours)
    fused = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    for r in range(len(fused) + 1):
        for eligible in itertools.combinations(fused, r):
            want = first_eligible(enabled, ours, set(eligible))
            assert first_eligible(enabled, CUDNN_FIRST, set(eligible)) == want, (backend, eligible)
    if backend != "cudnn":  # the configured kernel wins whenever it can run
        assert first_eligible(enabled, ours, set(fused)) == ours[0]


def test_sdpa_context_settles_torch_priority_once_before_entering(monkeypatch):
    seen = []
    monkeypatch.setattr(attention, "settle_torch_sdpa_priority", lambda device: seen.append(device))
    cuda = torch.device("cuda", 0)
    ctx = attention.sdpa_context("flash", cuda)
    assert seen == [cuda]
    with ctx:
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert attention.sdpa_context("flash", torch.device("cpu")).__class__.__name__ == "nullcontext"


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flop_model_counts_causal_pairs_summaries_and_frozen_weights():
    flops = FlopModel(n_trainable=1000, n_frozen=0, n_layers=2, width=64, summary_length=10, accumulate=True)
    # 3 segments of 100, one substep: forwards over 110, 120 and 120 positions (the last has no summary).
    want = sum(6 * 1000 * t + 12 * 2 * 64 * t * (t + 1) / 2 for t in (110, 120, 120))
    assert flops.per_sequence([[100, 100, 100]]) == pytest.approx(want)
    assert flops.per_sequence([[100], [100], [100]]) == pytest.approx(want)  # BPTT substeps: same work
    lora = FlopModel(n_trainable=10, n_frozen=990, n_layers=2, width=64, summary_length=0, accumulate=True)
    assert lora.per_sequence([[50]]) == pytest.approx((6 * 10 + 4 * 990) * 50 + 12 * 2 * 64 * 50 * 51 / 2)
    assert segment_flops(1, 1, 1, 4, causal=False) - segment_flops(1, 1, 1, 4) == 12 * (16 - 10)


def test_flop_model_of_a_variable_length_run_counts_every_slot():
    """Variable mode trains on `<sum>` plus all compression_max_len slots and passes all of them on (the absent
    ones masked), so its forwards are longer than summary_length suggests."""
    model = tiny_model("llama")
    cfg = RunConfig()
    c = cfg.compression
    c.compression_mode, c.compression_max_len, c.summary_length = "variable", 6, 2
    flops = FlopModel.of(model, cfg)
    n, frozen = flops.n_trainable, flops.n_frozen
    want = sum(
        segment_flops(n, flops.n_layers, flops.width, t, frozen) for t in (100 + 7, 6 + 100 + 7, 12 + 100)
    )
    assert flops.per_sequence([[100, 100, 100]]) == pytest.approx(want)


def test_flop_param_split_under_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", summary_length=3)
    config = model.config
    total = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "embed_summary" not in n
    )
    assert flop_param_split(model) == (total, 0)
    lora = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_summary"])
    )
    trainable, frozen = flop_param_split(lora)
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert (trainable, frozen) == (adapters, total)
    assert attention_width(config) == config.hidden_size


@pytest.mark.parametrize(
    "ds, bf16, applied, why",
    [
        ("ds_configs/zero1.json", True, True, ""),
        ("ds_configs/zero2.json", True, True, ""),
        ("ds_configs/zero3.json", False, True, ""),
        ({"zero_optimization": {"stage": 0}}, False, False, "ZeRO stage 0"),
        ("ds_configs/zero3_offload.json", True, False, "offload"),
        (
            {"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}},
            True,
            False,
            "fp32",
        ),
        ({"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "fp32"}}, True, True, ""),
    ],
)
def test_coalesced_reduction_applies_where_deepspeed_supports_it(tmp_path, ds, bf16, applied, why):
    """On by default; left out (with a notice naming why) under ZeRO stage 0, offload, and bf16 with fp32
    accumulation at stage 1 (DeepSpeed's BF16_Optimizer, which cannot coalesce)."""
    if isinstance(ds, dict):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"train_batch_size": "auto", **ds}))
        ds = str(path)
    cfg = RunConfig()
    cfg.train.deepspeed = ds
    cfg.train.precision = "bf16" if bf16 else "fp32"
    resolved = resolve_ds_config(cfg, BatchPlan(1, 1, 1), 1, torch.device("cpu"), hidden_size=64)
    assert cfg.train.coalesce_grad_reduction  # the default
    coalesce, notice = grad_reduction_plan(cfg, resolved)
    assert coalesce is applied
    assert (why in notice and "not applied" in notice) if why else notice == ""
    cfg.train.coalesce_grad_reduction = False
    assert grad_reduction_plan(cfg, resolved) == (False, "")


# ------------------------------------------------------------------------------------------------ ZeRO-3
@pytest.mark.parametrize(
    "world, persistence, prefetch", [(1, 2**62, int(0.9 * 64 * 64)), (2, 10 * 64, 5 * 10**7)]
)
def test_zero3_auto_values_persist_on_one_rank_and_prefetch_only_over_ranks(world, persistence, prefetch):
    cfg = RunConfig()
    cfg.train.deepspeed = "ds_configs/zero3.json"
    cfg.train.global_batch_size = world
    ds = resolve_ds_config(cfg, BatchPlan(1, 1, 2), world, torch.device("cpu"), hidden_size=64)
    zero = ds["zero_optimization"]
    assert zero["memory_efficient_linear"] is False  # keeps torch's linear: compiled layers need no ZeRO ids
    assert zero["stage3_param_persistence_threshold"] == persistence
    assert zero["reduce_bucket_size"] == 5 * 10**7
    assert zero["stage3_prefetch_bucket_size"] == prefetch


def test_zero3_whole_layers_marks_exactly_the_decoder_layers():
    from deepspeed.utils import get_z3_leaf_modules
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    mark_layers_as_zero3_units(model)
    assert get_z3_leaf_modules(model) == list(model.get_base_model().get_decoder().layers)


def test_zero3_reduce_bucket_is_capped_below_half_the_trainable_weights():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    sizes = [p.numel() for p in model.parameters()]
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5 * 10**7}}
    cap_zero3_reduce_bucket(model, ds)
    assert ds["zero_optimization"]["reduce_bucket_size"] == (sum(sizes) - max(sizes)) // 2
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapters = [p.numel() for p in lora.parameters() if p.requires_grad]
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 100}}
    cap_zero3_reduce_bucket(lora, ds)
    assert ds["zero_optimization"]["reduce_bucket_size"] == min(100, (sum(adapters) - max(adapters)) // 2)
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 10}}
    cap_zero3_reduce_bucket(model, ds)  # small enough already: kept
    assert ds["zero_optimization"]["reduce_bucket_size"] == 10


# --------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize(
    "family, length, padded, fields, graphs",
    [
        ("llama", "static", False, {}, 3),
        ("llama", "static", True, {}, 3),
        ("llama", "dynamic", False, {}, 1),
        ("llama", "dynamic", True, {}, 1),
        ("opt", "dynamic", False, {}, 1),  # OPT's layers also take its (unused) causal mask
        ("llama", "unbacked", False, {}, 1),  # the trainer's unpadded segments
        ("llama", "unbacked", True, {}, 1),  # a mask: a dynamic length
        ("opt", "unbacked", False, {}, 1),  # OPT passes its (unused) causal mask
        # Variable mode: the first segment has no presence bias, the next ones pass it folded (a second graph).
        ("llama", "unbacked", False, {"compression_mode": "variable", "compression_max_len": 3}, 2),
        ("llama", "dynamic", False, {"compression_mode": "variable", "compression_max_len": 3}, 2),
    ],
)
def test_compiled_layers_give_the_eager_loss_and_gradients(family, length, padded, fields, graphs):
    """Regional compilation must not change the maths: same loss and gradients as eager, through segment
    checkpointing (the compiled layers run again in the recompute) and three segment shapes. Static shapes
    compile a graph per shape; a dynamic or unbacked sequence length serves every shape with one graph, with
    and without a mask, without graph breaks. A dynamic length skips inductor's mix-order size checks (GPU
    kernels: each threshold a length crossed was a guard, so a recompile)."""
    import torch._inductor.config as inductor_config

    ids = random_ids(2, 15)
    mask = torch.ones_like(ids) if padded else None

    def run(compiled):
        torch._dynamo.reset()
        model = tiny_model(family, segment_gradient_checkpointing=True, **fields).train()
        if compiled:
            compile_decoder_layers(model, length)
        # Forwards of 9, 11 and 10 positions (fixed mode). (With a backed length, one equal to a weight's size,
        # such as the head size 8, may specialise the first graph: then a second, general one follows.)
        out = model(ids, attention_mask=mask, labels=ids, segment_lengths=[6, 5, 4], return_logits=False)
        out.loss.backward()
        return out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run(False)
    counters.clear()
    if hasattr(inductor_config.triton, "mix_order_reduction_non_strict_mode"):
        with inductor_config.patch({"triton.mix_order_reduction_non_strict_mode": length != "dynamic"}):
            loss, grads = run(True)  # the setting follows the compiled length (restored after)
            assert inductor_config.triton.mix_order_reduction_non_strict_mode == (length == "dynamic")
    else:
        loss, grads = run(True)
    assert counters["stats"]["unique_graphs"] == graphs  # shared by both layers
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("length", ["dynamic", "unbacked"])
def test_symbolic_length_makes_only_the_sequence_dimension_symbolic(monkeypatch, length):
    """A dynamic or unbacked length is one symbolic size (backed or unbacked, as asked): the batch stays static
    and no float becomes a graph input. torch.compile(dynamic=True) also lifted the layers' float attributes
    (the norms' epsilon) into inputs, 0-dim CPU tensors for which inductor compiled C++ kernels on GPU runs (the
    slowest part of the first step)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    graphs = []
    compile_ = torch.compile

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    def recording_compile(fn, **kwargs):  # the engine's settings, with a backend that records each graph
        kwargs.pop("options", None)
        return compile_(fn, backend=record, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    model = tiny_model("llama", segment_gradient_checkpointing=False).train()
    compile_decoder_layers(model, length)
    model(random_ids(2, 15), segment_lengths=[6, 5, 4], return_logits=False)  # forwards of 9, 11, 10
    assert len(graphs) == 1  # shared by both layers and every length
    values = [n.meta["example_value"] for n in graphs[0].graph.find_nodes(op="placeholder")]
    assert not [v for v in values if isinstance(v, (float, torch.SymFloat))]
    assert not [v for v in values if isinstance(v, torch.Tensor) and v.dtype == torch.float64]
    hidden = next(v for v in values if isinstance(v, torch.Tensor) and v.dim() == 3)
    assert isinstance(hidden.shape[0], int) and isinstance(hidden.shape[1], torch.SymInt)
    assert bool(free_unbacked_symbols(hidden.shape[1])) == (length == "unbacked")


def test_unbacked_length_falls_back_to_dynamic_where_attention_takes_a_mask():
    """`model.compile_length: unbacked` needs SDPA without a mask (`causal_attention`): under eager attention or
    variable mode's presence mask the trainer compiles a dynamic length and says why; fixed boundaries compile
    static shapes whatever the setting."""
    cfg = RunConfig()
    cfg.compression.randomize_segments = True
    cfg.model.compile_length = "unbacked"
    assert compile_length_plan(cfg, tiny_model("llama")) == ("unbacked", "")
    variable = {"compression_mode": "variable", "compression_max_len": 3}
    assert compile_length_plan(cfg, tiny_model("llama", **variable)) == ("unbacked", "")  # presence folded
    eager = tiny_model("llama")
    eager.config._attn_implementation = "eager"
    length, notice = compile_length_plan(cfg, eager)
    assert length == "dynamic" and "unbacked" in notice and "'eager'" in notice
    length, notice = compile_length_plan(cfg, tiny_model("llama", presence_attention="mask", **variable))
    assert length == "dynamic" and "presence mask" in notice
    cfg.model.compile_length = "dynamic"
    assert compile_length_plan(cfg, eager) == ("dynamic", "")
    cfg.compression.randomize_segments, cfg.compression.segment_lengths = False, [6, 5]
    assert compile_length_plan(cfg, eager) == ("static", "")


@pytest.mark.parametrize(
    "fields", [{}, {"accumulate_summary": False}, {"compression_mode": "variable", "compression_max_len": 3}]
)
def test_fixed_forward_lengths_are_the_lengths_the_trainer_runs(fields):
    """`fixed_forward_lengths` (counted from the config) = the lengths the decoder sees in the trainer's substeps
    (fixed boundaries, softprompt carried between substeps, none made by the block's last segment)."""
    from tiny_models import PlainEngine

    from acomp.config import CompressionConfig
    from acomp.train.loop import train_substep
    from acomp.train.segments import fixed_forward_lengths, split_substeps

    model = tiny_model("llama", **fields).train()
    c = CompressionConfig(randomize_segments=False, segment_lengths=[6, 4], training_substeps=3)
    c.summary_length = model.config.summary_length
    for key, value in fields.items():
        setattr(c, key, value)
    seen = set()
    layer = model.get_decoder().layers[0]
    layer.register_forward_pre_hook(lambda module, args, kwargs: seen.add(args[0].shape[1]), with_kwargs=True)
    substeps = split_substeps(random_ids(2, 30), c, max_segment_length=64)
    softprompt = None
    for i, substep in enumerate(substeps):
        carry = i < len(substeps) - 1
        softprompt = train_substep(PlainEngine(model), substep, softprompt, carry).softprompt
    assert seen == fixed_forward_lengths(c)


def test_fixed_boundaries_compile_a_dynamic_length_past_torchs_graph_limit():
    """Fixed boundaries compile a graph per distinct length, and with periodic evaluation one more without
    gradients per length the held-out loss runs (the training lengths and the last segment alone); past torch's
    recompile limit (8) new shapes run eager, so such a run compiles a symbolic length instead: e.g. a block of
    many segments with accumulating summaries (the 30K recipe's 20 segments: 19 lengths)."""
    from acomp.train.segments import fixed_forward_lengths

    cfg = RunConfig()
    c = cfg.compression
    c.randomize_segments, c.summary_length, c.segment_lengths = False, 50, [1536, 1536]
    c.training_substeps, c.segments_per_substep = 2, 2
    assert len(fixed_forward_lengths(c)) == 3  # the last segment's length, without summary tokens, repeats
    cfg.train.eval_every = 100
    model = tiny_model("llama")
    assert compile_length_plan(cfg, model) == ("static", "")  # 3 + 4 graphs
    c.training_substeps = 10
    assert len(fixed_forward_lengths(c)) == 19
    length, notice = compile_length_plan(cfg, model)
    assert length == "dynamic" and "19 decoder lengths, 39 graphs" in notice and "(8)" in notice
    cfg.model.compile_length = "unbacked"
    assert compile_length_plan(cfg, model)[0] == "unbacked"
    cfg.model.compile_length = "dynamic"
    c.training_substeps, c.accumulate_summary, c.segment_lengths = 2, False, [1000, 1100]
    assert len(fixed_forward_lengths(c)) == 4
    assert compile_length_plan(cfg, model)[0] == "dynamic"  # 4 + 5 graphs with the held-out loss
    cfg.train.eval_every = 0
    assert compile_length_plan(cfg, model) == ("static", "")


@pytest.mark.slow
def test_compiled_layers_under_zero3_train_as_eager_layers(tmp_path_factory, tmp_path):
    """ZeRO-3 gathers and releases each layer's weights in hooks around its (compiled) forward: the trainer
    with random segment boundaries gives the eager run's losses, step by step, with a dynamic and with an
    unbacked length (`model.compile_length`)."""
    from runs import launch, losses, tiny_config, tiny_corpus, write_config

    corpus = tiny_corpus(tmp_path_factory)
    random = {"randomize_segments": True, "segment_lengths": []}
    runs = {}
    for name, model in (
        ("eager", {"compile_layers": False}),
        ("compiled", {"compile_layers": True}),
        ("unbacked", {"compile_layers": True, "compile_length": "unbacked"}),
    ):
        cfg = tiny_config(corpus, tmp_path / name, compression=random, model=model)
        launch(write_config(tmp_path / f"{name}.yaml", cfg), ["train.max_steps=3"], timeout=900)
        runs[name] = losses(tmp_path / name)
    for name in ("compiled", "unbacked"):
        assert sorted(runs[name]) == [1, 2, 3]
        for step, loss in runs["eager"].items():
            assert runs[name][step] == pytest.approx(loss, rel=1e-5), (name, step, runs)


STACK_PROBE = """
import json, sys
from acomp.config import config_from_dict
from acomp.train.distributed import init_distributed
from acomp.train.loop import build, train_step
from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK

trainer = build(config_from_dict(json.loads(sys.argv[1])), init_distributed())
depths = [len(FWD_MODULE_STACK)]
for step in range(3):
    train_step(trainer, step)
    depths.append(len(FWD_MODULE_STACK))
print("RESULT", json.dumps(depths))
"""

TRACE_PROBE = """
import json, sys
import acomp.modeling.compressor as compressor
from acomp.config import config_from_dict
from acomp.train.distributed import init_distributed
from acomp.train.loop import build, train_step
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

invalidated, heads, lengths, calls = [], [0], [], []
invalidate = Coordinator._invalidate_trace
Coordinator._invalidate_trace = lambda self: (invalidated.append(1), invalidate(self))[1]
summed_nll = compressor.summed_nll
compressor.summed_nll = lambda *a: (heads.__setitem__(0, heads[0] + 1), summed_nll(*a))[1]
forward = compressor.ChunkedNLL.forward

def recording(self, head, hidden, targets, chunk_tokens):
    before = heads[0]
    out = forward(self, head, hidden, targets, chunk_tokens)
    lengths.append(targets.shape[1])
    calls.append(heads[0] - before)
    return out

compressor.ChunkedNLL.forward = recording
trainer = build(config_from_dict(json.loads(sys.argv[1])), init_distributed())
for step in range(4):
    train_step(trainer, step)
needed = sorted({compressor.loss_slices(8, 2, n) for n in lengths})  # loss_chunk_size 8, micro-batch 2
complete = trainer.engine.optimizer.parameter_offload.get_param_coordinator().is_complete_trace()
print("RESULT", json.dumps(dict(invalidated=len(invalidated), complete=complete, needed=needed, calls=sorted(set(calls)))))
"""


def run_probe(probe: str, cfg: dict):
    """Run `probe` (a script given the config as JSON) as a one-rank trainer process; its RESULT line."""
    import subprocess
    import sys

    from runs import REPO, rank_env, train_env

    from acomp.train.distributed import free_port

    env = {**train_env(), **rank_env(0, 1, free_port())}
    proc = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(cfg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.slow
def test_zero3_module_stack_does_not_grow_with_steps(tmp_path_factory, tmp_path):
    """A checkpointed segment's recompute stops early inside the chunked loss's forward, so ZeRO-3's forward
    post-hook never pops that module: without the trainer's restore, DeepSpeed's module stack grows by one per
    recomputed segment (here 2 per step)."""
    from runs import tiny_config, tiny_corpus

    cfg = tiny_config(tiny_corpus(tmp_path_factory), tmp_path / "out")  # ZeRO-3, segment checkpointing
    depths = run_probe(STACK_PROBE, cfg)
    assert depths == [depths[0]] * 4, depths  # the engine's own top module only


@pytest.mark.slow
def test_zero3_trace_survives_random_boundaries_with_a_chunked_loss(tmp_path_factory, tmp_path):
    """ZeRO-3 prefetches weights by the order of module calls it traced in an earlier step, and drops the
    trace when a step calls modules in another order. With random boundaries the slices the chunked loss
    needs change from segment to segment; the trainer fixes their number for the run, so the LM-head calls
    stay the same and the trace is kept (it used to be dropped at every step: every weight fetch a gather
    and a stream synchronisation: keeping it won 1.23x on Llama-1B ZeRO-3 on a GPU, benchmarks/RESULTS.md)."""
    from runs import tiny_config, tiny_corpus

    random = {"randomize_segments": True, "segment_lengths": []}
    cfg = tiny_config(
        tiny_corpus(tmp_path_factory), tmp_path / "out", compression=random, model={"loss_chunk_size": 8}
    )  # micro-batch 2: chunks of 4 positions
    result = run_probe(TRACE_PROBE, cfg)
    assert len(result["needed"]) > 1, result  # the case: segments that need different numbers of slices
    assert len(result["calls"]) == 1, result  # yet every segment calls the head equally often
    assert result["invalidated"] == 0 and result["complete"], result


AUTO_CHECKPOINTING_PROBE = """
import json, os, sys
import acomp.modeling.compressor as compressor
from acomp.config import config_from_dict
from acomp.train.checkpointing import CheckpointingProbe
from acomp.train.distributed import init_distributed
from acomp.train.engine import unwrap
from acomp.train.loop import build, train_step
from acomp.train.segments import sequence_positions

args = json.loads(sys.argv[1])
fits, out_file = args.pop("fits"), args.pop("out_file", None)  # out_file: one file per rank
export_dir = args.pop("export_dir", None)
if isinstance(fits, list):  # one answer per rank
    fits = fits[int(os.environ["RANK"])]
recomputes = [0]
checkpoint = compressor.checkpoint


def counting(fn, *a, **k):  # segment checkpoints only (the chunked loss checkpoints its chunks too)
    recomputes[0] += getattr(fn, "__name__", "") == "_segment"
    return checkpoint(fn, *a, **k)


compressor.checkpoint = counting


class Readings(CheckpointingProbe):  # a GPU of 100 units; each forward holds 2 units per position
    held = 0

    def allocated(self):
        return self.held

    def forward_done(self):
        self.held = 2 * self._positions[-1]
        super().forward_done()
        self.held = 0

    def peak(self):
        return 10

    def reset_peak(self):
        pass

    def capacity(self):
        return 100 if fits is None else 10**9 if fits else 20


trainer = build(config_from_dict(args), init_distributed())
built_with_probe = trainer.checkpointing_probe is not None
if fits is not None:
    trainer.checkpointing_probe = probe = Readings(trainer.engine.device)
model = unwrap(trainer.engine)
losses, flags, calls, notices = [], [], [], []
for step in range(3):
    before = recomputes[0]
    out = train_step(trainer, step)
    losses.append(sum(float(l) for m in out.losses for l in m))
    flags.append([recomputes[0] - before, model.config.segment_gradient_checkpointing])
    notices.append(out.notice)
    if step == 1 and fits is not None:
        f = trainer.flops
        counted = [sum(sequence_positions(seq, f.summary_length, f.accumulate, f.summary_positions)) for seq in out.segments]
        calls = [sum(sum(p) for _, p in probe.calls), sum(counted), len(probe.calls)]
exported = None
if export_dir:  # the exported config records the setting the run asked for, not what auto decided here
    from pathlib import Path
    from acomp.train.checkpoint import export_hf

    export_hf(trainer.engine, trainer.cfg, Path(export_dir), trainer.dist)
    exported = json.loads((Path(export_dir) / "config.json").read_text())["segment_gradient_checkpointing"]
result = json.dumps(dict(losses=losses, flags=flags, calls=calls, built_with_probe=built_with_probe,
                         notices=notices, exported=exported))
if out_file:
    with open(out_file + "." + os.environ["RANK"], "w") as f:
        f.write(result)
print("RESULT", result)
"""


@pytest.mark.slow
def test_auto_segment_checkpointing_turns_off_where_it_fits(tmp_path_factory, tmp_path):
    """`compression.segment_gradient_checkpointing: auto` trains its first two steps with segment checkpointing
    (the recompute runs) and then decides from the second step's memory readings (stood in for a GPU here):
    where the estimate fits, nothing is recomputed from step 3 on, and the losses are those of checkpointing always on
    and always off; where it does not fit, checkpointing stays on. On CPU it stays on with no readings taken.
    The probe sees every forward of the step, with the positions the MFU count gives it."""
    from runs import tiny_config, tiny_corpus

    corpus = tiny_corpus(tmp_path_factory)
    random = {"randomize_segments": True, "segment_lengths": []}
    results = {}
    for name, setting, fits in (
        ("on", True, None),
        ("off", False, None),
        ("auto-fits", "auto", True),
        ("auto-full", "auto", False),
        ("auto-cpu", "auto", None),
    ):
        cfg = tiny_config(
            corpus, tmp_path / name, compression={**random, "segment_gradient_checkpointing": setting}
        )
        export = str(tmp_path / name / "final") if name == "auto-fits" else None
        results[name] = run_probe(AUTO_CHECKPOINTING_PROBE, {**cfg, "fits": fits, "export_dir": export})
    # recomputed segments per step: 2 substeps x 1 (one micro-batch; two segments a call, the last not recomputed)
    segments = 2
    assert results["on"]["flags"] == [[segments, True]] * 3
    assert results["off"]["flags"] == [[0, False]] * 3
    decided_after_step_2 = [[segments, True], [segments, False], [0, False]]
    assert results["auto-fits"]["flags"] == decided_after_step_2
    assert results["auto-full"]["flags"] == [[segments, True]] * 3
    assert results["auto-cpu"]["flags"] == [[segments, True]] * 3
    assert not results["auto-cpu"]["built_with_probe"]
    for name in ("off", "auto-fits", "auto-full"):
        assert results[name]["losses"] == pytest.approx(results["on"]["losses"], rel=1e-6), (name, results)
    assert results["auto-fits"]["notices"][0] is None and results["auto-fits"]["notices"][2] is None
    assert results["auto-fits"]["notices"][1].startswith("segment checkpointing (auto): off from step 3;")
    assert results["auto-full"]["notices"][1].startswith("segment checkpointing (auto): kept on;")
    assert results["auto-fits"]["exported"] is True  # as configured (auto starts on), not as decided here
    held, counted, calls = results["auto-fits"]["calls"]
    assert held == counted and calls == 2  # one call per substep


def test_auto_segment_checkpointing_estimate():
    """The estimate of the peak without checkpointing: the measured step's peak plus the activations of the
    longest call but its shortest last segment, at the rate (bytes held per position of the unrecomputed last
    segment) of the call whose last segment is longest; off only within FRACTION of the reachable memory."""
    from acomp.train.checkpointing import FRACTION, CheckpointingProbe

    class Readings(CheckpointingProbe):
        def peak(self):
            return 1000

        def capacity(self):
            return self.reachable

    probe = Readings(torch.device("cpu"))
    # (bytes held after the forward, positions per segment): the rate is the first call's, 300 / 150 = 2; the
    # longest call has 450 positions, the shortest last segment 10
    probe.calls = [(300, [100, 150]), (500, [400, 50]), (80, [120, 10])]
    estimate = 1000 + 2 * (450 - 10)
    probe.reachable = estimate / FRACTION
    decision = probe.decide()
    assert decision.estimate_gib * 2**30 == pytest.approx(estimate)
    assert decision.off
    probe.reachable = estimate / FRACTION - 1
    assert not probe.decide().off


@pytest.mark.slow
def test_auto_segment_checkpointing_agrees_over_ranks(tmp_path_factory, tmp_path):
    """Two ZeRO-3 ranks whose readings disagree (it fits on rank 0 only) both keep checkpointing: a rank that turned
    it off alone would call ZeRO-3's gathers in another order than the other rank. Where it fits on both, both
    turn it off after step 2 and train on with the same losses."""
    import subprocess
    import sys

    from runs import REPO, tiny_config, tiny_corpus, train_env

    from acomp.train.distributed import free_port

    cfg = tiny_config(
        tiny_corpus(tmp_path_factory),
        tmp_path / "out",
        compression={
            "randomize_segments": True,
            "segment_lengths": [],
            "segment_gradient_checkpointing": "auto",
        },
        train={"micro_batch_size": 1},
    )
    script = tmp_path / "probe.py"
    script.write_text(AUTO_CHECKPOINTING_PROBE)
    results = {}
    for name, fits in (("disagree", [True, False]), ("fit", [True, True])):
        out_file = str(tmp_path / name)
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             str(script), json.dumps({**cfg, "fits": fits, "out_file": out_file})],
            cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[name] = [json.loads(Path(f"{out_file}.{rank}").read_text()) for rank in (0, 1)]
    for kept, switched in zip(results["disagree"], results["fit"], strict=True):  # rank by rank
        # one segment recomputed per call: 2 substeps, one micro-batch per rank
        assert kept["flags"] == [[2, True]] * 3, results
        assert switched["flags"] == [[2, True], [2, False], [0, False]], results
        assert switched["losses"] == pytest.approx(kept["losses"], rel=1e-6), results


def test_auto_segment_checkpointing_stays_on_where_attention_memory_is_quadratic():
    """`auto`'s estimate grows activations linearly with positions, so it keeps checkpointing where a segment's
    attention memory grows with the square of its length."""
    from types import SimpleNamespace

    from acomp.train.checkpointing import quadratic_attention

    def reason(implementation="sdpa", presence="auto", **overrides):
        cfg = RunConfig()
        for key, value in overrides.items():
            section, name = key.split("__")
            setattr(getattr(cfg, section), name, value)
        model_config = SimpleNamespace(_attn_implementation=implementation, presence_attention=presence)
        return quadratic_attention(model_config, cfg)

    assert reason() is None  # SDPA, auto: flash with random boundaries
    assert reason("flash_attention_2") is None
    assert reason(model__sdpa_backend="efficient") is None
    assert reason(compression__compression_mode="variable") is None  # the presence bias folded
    assert reason("eager") == "eager attention"
    assert reason(model__sdpa_backend="math") == "SDPA's math kernel"
    assert (
        reason(presence="mask", compression__compression_mode="variable")
        == "the variable mode's 4D presence mask"
    )
