"""Generation conditioned on summary vectors, with a KV cache.

The softprompt and the prompt are encoded once (prefill); then each new token is decoded
incrementally against the cache. Positions follow the model's position rule, so the cached run
matches a full forward over [softprompt ; prompt ; generated] token for token.

Three decoding modes, same tokens (tests/test_modeling.py):
- `dynamic`: transformers' DynamicCache grows by one column per step (any device; the default).
- `static`: the prefill's keys/values are copied into a preallocated StaticCache of the final length and
  every step has the same shapes (a fixed additive key mask instead of a growing 2D one); with grouped-query
  attention the step reads each KV head once (attention.grouped_decode_attention).
- `cuda_graph`: `static`, with the step (embed -> decoder -> LM head, and for greedy decoding the token's
  choice and record) captured once in a CUDA graph and replayed. A decode step of a 1B model is ~300 small
  kernels; eager, their launch overhead, not memory bandwidth, bounds the step time (benchmarks/RESULTS.md,
  compressed inference).
`compile_step=True` (with `static` or `cuda_graph`) runs the step through torch.compile: RMSNorm, RoPE,
SwiGLU and the residual adds fuse, so a replayed step has fewer, larger kernels. The compiled step is kept for
the process; each new (batch, cache length) compiles once, within torch's recompile limit
(`torch._dynamo.config.recompile_limit`), after which new shapes run eager.
`freeze_weights=True` (with `compile_step`) compiles the step with inductor's freezing: the weights become
constants of the graph, so the projections that read the same input are concatenated once into one GEMM
(gate/up; query/key/value from torch 2.12, whose rule admits grouped-query shapes). At decode batch sizes those
GEMMs are latency-bound, so fewer, wider ones are faster (benchmarks/RESULTS.md). Each compiled shape keeps its
own concatenated weights (1.2 GB for Llama-1B). The constants are copies taken at compile time: when a model's
weights change in place, its next frozen call compiles again.
`graphs=DecodeGraphs()` keeps each call's fixed-shape step (static cache, buffers, captured graph) for later calls
of the same shape, which then skip the cache allocation, warm-up and capture.
The prefill always runs through the DynamicCache, so a long context keeps the fast causal attention kernels.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import types
import weakref

import torch
from transformers import DynamicCache, StaticCache

from .attention import decode_attention, sdpa_context
from .compressor import attention_bias, key_bias
from .variable import absent_bias


@torch.no_grad()
def generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    softprompt: torch.Tensor | None = None,
    softprompt_bias: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    suppress_token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
    decoding: str = "dynamic",
    compile_step: bool = False,
    freeze_weights: bool = False,
    graphs: DecodeGraphs | None = None,
) -> torch.LongTensor:
    """Returns [B, prompt_len + new] token ids. Greedy unless do_sample. Prompts may be padded on either
    side (positions come from the attention mask). After a sample emits EOS it is filled with pad_token_id;
    `eos_token_id=None` takes the config's, `[]` generates exactly max_new_tokens.
    `softprompt_bias` (variable-length mode) marks absent softprompt vectors. The control tokens
    `<sum>` / `<eoc>` are never generated. `decoding`: 'dynamic', 'static' or 'cuda_graph'; `compile_step`:
    torch.compile the fixed-shape step; `freeze_weights`: compile it with the weights as constants, which fuses
    projections that share an input (both: module docstring); `graphs`: a DecodeGraphs that keeps the
    fixed-shape step (its static cache and CUDA graph) for the next call of the same shape."""
    if decoding not in DECODING_MODES:
        raise ValueError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {decoding!r}")
    if compile_step and decoding == "dynamic":
        raise ValueError(
            "compile_step=True needs decoding='static' or 'cuda_graph' (fixed shapes), got 'dynamic'"
        )
    if freeze_weights and not compile_step:
        raise ValueError("freeze_weights=True needs compile_step=True (it is a setting of the compiled step)")
    if graphs is not None and not isinstance(graphs, DecodeGraphs):
        raise TypeError(f"graphs must be an acomp DecodeGraphs, got {type(graphs).__name__}")
    if graphs is not None and decoding == "dynamic":
        raise ValueError(
            "graphs=DecodeGraphs(...) needs decoding='static' or 'cuda_graph' (fixed shapes), got 'dynamic'"
        )
    if decoding == "cuda_graph" and input_ids.device.type != "cuda":
        raise ValueError(
            f"decoding='cuda_graph' needs the model and inputs on a CUDA device, got {input_ids.device}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    config = model.config
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos_ids = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id)
    )
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids or [0])[0]

    embed = model.get_input_embeddings()
    softprompt = model._check_softprompt(softprompt, batch, embed.embedding_dim, embed.weight)
    softprompt_bias = model._check_softprompt_bias(softprompt_bias, softprompt, batch)
    soft_len = 0 if softprompt is None else softprompt.shape[1]
    rule = model.position_rule
    control = [getattr(config, k, None) for k in ("sum_token_id", "eoc_token_id")]
    suppress_token_ids = list(suppress_token_ids or []) + [t for t in control if t is not None]
    # On the device once: indexing with a Python list would copy it to the GPU at every step.
    suppress = torch.tensor(suppress_token_ids, dtype=torch.long, device=device)

    # Prefill: [softprompt ; prompt] in one pass.
    mask = torch.cat([attention_mask.new_ones(batch, soft_len), attention_mask], dim=1)
    dtype = embed.weight.dtype
    cache, next_logits = _prefill(model, input_ids, attention_mask, mask, softprompt, softprompt_bias)
    next_position = rule.first_new_position(soft_len, attention_mask)

    if max_new_tokens == 0:
        return input_ids
    # Fixed-shape decoding: a step of this shape kept by `graphs` from an earlier call, or a new one. Its
    # token record, like the rest of its buffers, is reused in place (a captured graph writes into it).
    static = None
    if decoding != "dynamic":
        shape = _StaticShape(
            batch=batch,
            length=-(-(soft_len + prompt_len + max_new_tokens) // 16) * 16,  # mask rows 16-aligned for SDPA
            dtype=dtype,
            device=device,
            cuda_graph=decoding == "cuda_graph",
            # Greedy choice is deterministic: the captured step picks and records the token itself, so the
            # host loop only replays. Sampling draws from `generator` outside the graph.
            choose_inside=not do_sample,
            eos=tuple(eos_ids),
            pad_token_id=pad_token_id,
            suppress=tuple(suppress_token_ids),
            sdpa_backend=config.sdpa_backend,
            step_kind="frozen" if freeze_weights else "compiled" if compile_step else "eager",
        )
        # Chosen once per call: the frozen step's weight check walks every parameter.
        step_fn = _FROZEN_STEPS.get(model) if freeze_weights else _compiled_step() if compile_step else _step
        static = graphs.take(model, shape, step_fn) if graphs is not None else None
        if static is None:
            static = _StaticStep(model, shape, step_fn)
        record = static.record
        record.reset()
    else:
        # Every chosen token is written to a [B, max_new_tokens] buffer on the device; once a sample emits EOS
        # its later tokens are pad_token_id.
        record = _TokenRecord(batch, max_new_tokens, eos, pad_token_id, device)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        return record.add(_pick(logits.float(), do_sample, temperature, top_k, top_p, suppress, generator))

    token = choose(next_logits)

    # Decoding masks the prefill's keys with an additive bias [B, prefill]: absent summary vectors and prompt
    # padding removed. The dynamic cache needs it only for absent vectors (otherwise the 2D mask says it all).
    if decoding == "dynamic":
        bias = None
        if softprompt_bias is not None:
            bias = key_bias(softprompt_bias, attention_mask, 0, dtype)[:, None, None, :]
        step = _DynamicStep(model, cache, mask, bias, token, next_position, choose)
    else:
        soft_bias = (
            softprompt_bias if softprompt_bias is not None else mask.new_zeros(batch, soft_len).float()
        )
        static.load(cache, key_bias(soft_bias, attention_mask, 0, dtype), token, next_position, choose)
        del cache  # the static cache holds a copy
        step = static

    # Without EOS ids the host never reads the device, so the CPU queues steps ahead of the GPU. With them, a
    # replayed graph reads "every sample has emitted EOS" one step late (_EosWatch), so the GPU is not left
    # waiting for the host between steps; a step run past the last EOS only records pad tokens and is cut.
    watch = _EosWatch(record, lagged=decoding == "cuda_graph")
    produced = 1
    while produced < max_new_tokens:
        if watch.all_finished():
            break
        step.advance()
        watch.stepped()
        produced += 1
    out = torch.cat([input_ids, record.tokens[:, : record.length(produced)]], dim=1)
    if graphs is not None:
        graphs.keep(model, static)
    return out


def _prefill(model, input_ids, attention_mask, mask, softprompt, softprompt_bias):
    """(DynamicCache of [softprompt ; prompt], the next token's logits [B, V]). `mask` [B, S + P] is the 2D
    mask of both; absent summary vectors (softprompt_bias) are masked through a 4D additive bias instead."""
    embed = model.get_input_embeddings()
    batch, prompt_len = input_ids.shape
    soft_len = mask.shape[1] - prompt_len
    embeds = embed(input_ids)
    if softprompt is not None:
        embeds = torch.cat([softprompt, embeds], dim=1)
    prefill_mask = mask
    if softprompt_bias is not None:  # absent vectors are masked through an additive bias on their keys
        prefill_mask = attention_bias(softprompt_bias, attention_mask, 0, embeds.dtype)
    cache = DynamicCache()
    with sdpa_context(model.config.sdpa_backend, input_ids.device):
        hidden = model.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=prefill_mask,
            position_ids=model.position_rule.segment(soft_len, attention_mask, 0),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    # The next token is predicted at the last real prompt token (the last column under left padding), or with
    # an empty prompt at the last summary vector.
    if prompt_len == 0:
        last_real = torch.full((batch,), soft_len - 1, device=input_ids.device)
    else:
        last_real = soft_len + _last_true_index(attention_mask)
    return cache, model.lm_head(hidden[torch.arange(batch, device=input_ids.device), last_real.clamp(min=0)])


DECODING_MODES = ("dynamic", "static", "cuda_graph")


class _TokenRecord:
    """The generated tokens [B, width >= max_new_tokens] and which samples have emitted EOS, kept on the device
    and updated in place (so a captured step can record its own token). A static step's record is as wide as its
    cache, so any call it serves fits."""

    def __init__(self, batch: int, max_new_tokens: int, eos: torch.Tensor, pad_token_id: int, device):
        self.tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos, self.pad_token_id = eos, pad_token_id

    def add(self, token: torch.Tensor) -> torch.Tensor:
        token = token.masked_fill(self.finished, self.pad_token_id)
        self.tokens.index_copy_(1, self.index, token[:, None])
        self.index += 1
        if self.eos.numel():
            self.finished |= (token[:, None] == self.eos).any(dim=1)
        return token

    def state(self) -> list[torch.Tensor]:
        return [self.index, self.finished]

    def reset(self) -> None:
        """Empty, for a new call (in place: a captured step records into these tensors)."""
        self.tokens.zero_()
        self.index.zero_()
        self.finished.zero_()

    def length(self, produced: int) -> int:
        """Columns to return of the `produced` recorded: once every sample has emitted EOS, up to the step at
        which the last one did (what a per-step check would have stopped at)."""
        if not self.eos.numel() or not bool(self.finished.all()):
            return produced
        is_eos = (self.tokens[:, :produced, None] == self.eos).any(dim=-1)
        return int(is_eos.int().argmax(dim=1).max()) + 1


class _EosWatch:
    """Tells the decode loop when every sample has emitted EOS, a flag the host must read from the device.
    Read at once, the read waits for the step just queued and leaves the GPU idle until the host queues the
    next one (about 0.05 ms per step on an H200, 3% of a compressed-side step). `lagged` (for replayed graphs):
    after each step the flag is copied to host memory without blocking, and the loop reads the copy of the step
    before, waiting only until that step is done while the last one runs. Generation then stops one step late;
    that step records pad tokens only, and `_TokenRecord.length` cuts it."""

    def __init__(self, record: _TokenRecord, lagged: bool):
        self.record, self.lagged = record, lagged
        self.active = bool(record.eos.numel())
        self.pending: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self.stepped()  # the first token, chosen after the prefill

    def stepped(self) -> None:
        if not (self.active and self.lagged):
            return
        finished = self.record.finished
        on_cuda = finished.device.type == "cuda"
        flag = torch.zeros((), dtype=torch.bool, pin_memory=on_cuda)
        flag.copy_(finished.all(), non_blocking=on_cuda)
        event = None
        if on_cuda:  # on the stream that runs the copy, whichever device is current
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(finished.device))
        self.pending.append((flag, event))

    def all_finished(self) -> bool:
        if not self.active:
            return False
        if not self.lagged:
            return bool(self.record.finished.all())
        if len(self.pending) < 2:  # the newest copy is the step still running
            return False
        flag, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        return bool(flag)


class _DynamicStep:
    """One decode step on a DynamicCache: the 2D mask (or, with a softprompt bias, the 4D key bias) grows
    by one column per step."""

    def __init__(self, model, cache, mask, bias, token, position, choose):
        self.model, self.cache, self.mask, self.bias = model, cache, mask, bias
        self.token, self.position, self.choose = token, position, choose

    def advance(self) -> None:
        batch = self.token.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones(batch, 1)], dim=1)
        step_mask = self.mask
        if self.bias is not None:
            self.bias = torch.cat([self.bias, self.bias.new_zeros(batch, 1, 1, 1)], dim=-1)
            step_mask = self.bias
        logits = _decode_logits(self.model, self.token, step_mask, self.position[:, None], self.cache)
        self.position = self.position + 1
        self.token = self.choose(logits)


@dataclasses.dataclass(frozen=True)
class _StaticShape:
    """What a fixed-shape step is built for, beyond the model and its step function: its buffers' shapes and
    the values a captured graph holds as constants (EOS and suppressed ids, the pad id, the SDPA backend), and
    which step function runs it. Calls with equal shapes can share one step (DecodeGraphs)."""

    batch: int
    length: int  # static cache length: prefill + new tokens, rounded up to 16
    dtype: torch.dtype
    device: torch.device
    cuda_graph: bool
    choose_inside: bool
    eos: tuple[int, ...]
    pad_token_id: int
    suppress: tuple[int, ...]
    sdpa_backend: str | None
    step_kind: str  # "eager", "compiled" or "frozen"


class _StaticStep:
    """One decode step with fixed shapes: a StaticCache of `shape.length` columns, an additive key mask
    [B, 1, 1, L], and device buffers for the token, its position, its cache column and the token record. The
    step itself opens its key column, advances the position buffers and (with `choose_inside`) chooses and
    records the next token, so a CUDA graph of it (`cuda_graph`: captured at the first step) is replayed with no
    host work. Every call's state is loaded into the same buffers (`load`), so a kept step (DecodeGraphs) replays
    its graph in later calls."""

    def __init__(self, model, shape: _StaticShape, step):
        self.model, self.shape, self.step = model, shape, step
        batch, length, dtype, device = shape.batch, shape.length, shape.dtype, shape.device
        self.cache = StaticCache(
            config=model.config, max_cache_len=length, max_batch_size=batch, device=device, dtype=dtype
        )
        self.bias = torch.empty(batch, 1, 1, length, dtype=dtype, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)
        # The record and the suppressed ids belong to the step: a captured graph reads and writes these tensors.
        eos = torch.tensor(shape.eos, dtype=torch.long, device=device)
        self.record = _TokenRecord(batch, length, eos, shape.pad_token_id, device)
        self.suppress = torch.tensor(shape.suppress, dtype=torch.long, device=device)
        self.graph, self.logits, self.choose = None, None, None
        self.weights = None  # where the weights were when the step was kept (DecodeGraphs)

    def load(self, prefill_cache, prefill_bias, token, position, choose) -> None:
        """Start a call: the prefill's keys/values [B, H, n, D] into the first n columns, their key bias
        (later columns absent until their step opens them), the first token and its position. `choose` picks
        tokens outside the graph (sampling)."""
        prefill_len = prefill_bias.shape[1]
        positions = torch.arange(prefill_len, device=self.shape.device)
        for layer, (keys, values) in enumerate(_cached_layers(prefill_cache)):
            self.cache.update(keys, values, layer, {"cache_position": positions})
        _unmark_static_addresses(self.cache)
        self.bias.fill_(absent_bias(self.shape.dtype))
        self.bias[:, 0, 0, :prefill_len] = prefill_bias
        self.token.copy_(token)
        self.position.copy_(position[:, None])
        self.cache_position.fill_(prefill_len)
        self.choose = choose

    def _pick_inside(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy choice and its record, from the step's own tensors (a graph may outlive the call)."""
        return self.record.add(_pick(logits.float(), False, 1.0, None, None, self.suppress, None))

    def _forward(self) -> torch.Tensor:
        """The step: open this token's key column, decode it, advance the positions, choose the next token."""
        self.bias.index_fill_(-1, self.cache_position, 0.0)
        logits = _decode_logits(
            self.model,
            self.token,
            self.bias,
            self.position,
            self.cache,
            self.cache_position,
            grouped=True,
            step=self.step,
        )
        self.position += 1
        self.cache_position += 1
        if self.shape.choose_inside:
            self.token.copy_(self._pick_inside(logits))
        return logits

    def advance(self) -> None:
        if not self.shape.cuda_graph:
            logits = self._forward()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        if not self.shape.choose_inside:
            self.token.copy_(self.choose(logits))

    def _capture(self) -> None:
        # Warm up on a side stream (as torch's CUDA graph docs ask), then capture. The warm-up runs the step
        # once: it writes this step's keys/values (the same ones the first replay writes again) and advances
        # the step's buffers and the token record, which are restored before the capture.
        state = [self.token, self.position, self.cache_position, *self.record.state()]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()


class DecodeGraphs:
    """Fixed-shape decode steps kept across `generate` calls (`generate(..., graphs=...)`, with
    `decoding="static"` or `"cuda_graph"`). A call whose shape was decoded before, the same model, batch size,
    static cache length (prompt + summary vectors + new tokens, rounded up to 16), greedy or sampled, EOS,
    pad and suppressed ids, reuses that call's static cache and buffers and, with `cuda_graph`, replays its
    captured graph: no cache allocation, no warm-up and no capture (11-16 ms of capture and most of the setup
    per call on an H200 for a 1B model; benchmarks/RESULTS.md). Holding a step holds its KV cache and graph
    memory: at most `max_steps` are kept (the least recently used go first); `clear()` or dropping this object
    frees them. A step is not reused once the model's weights have moved to other tensors (a captured graph
    reads them by address), or with `freeze_weights=True` once they changed in place (its constants are
    copies); it is then rebuilt.
    Not thread-safe: a step taken by a running call is not handed to another until that call returns."""

    def __init__(self, max_steps: int = 4):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self._steps: collections.OrderedDict = collections.OrderedDict()  # (model id, shape) -> step

    def __len__(self) -> int:
        return len(self._steps)

    def clear(self) -> None:
        self._steps.clear()

    def take(self, model, shape: _StaticShape, step_fn) -> _StaticStep | None:
        """The kept step for this call, removed while the call runs; None when there is none to reuse."""
        kept = self._steps.pop((id(model), shape), None)
        if kept is None or kept.step is not step_fn:
            return None
        if kept.weights != _weight_pointers(model):
            return None
        return kept

    def keep(self, model, step: _StaticStep) -> None:
        step.choose = None  # the finished call's sampler (and its generator) is not kept with the step
        # The addresses its graph reads (it was captured in one of the calls that used this step).
        step.weights = _weight_pointers(model)
        self._steps[(id(model), step.shape)] = step
        while len(self._steps) > self.max_steps:
            self._steps.popitem(last=False)


def _decode_logits(model, token, mask, position_ids, cache, cache_position=None, grouped=False, step=None):
    """Next-token logits [B, V] of one decode step: tokens [B] at `position_ids` [B, 1] against `cache`.
    `grouped`: grouped-query decode attention (attention.decode_attention), for the static mask; `step`: the
    step function (`_step` by default, `_compiled_step()` or `_FROZEN_STEPS.get(model)`). The attention and
    SDPA settings are entered outside it, since a compiled step compiles at the call."""
    config = model.config
    attention = decode_attention(config) if grouped else contextlib.nullcontext()
    with sdpa_context(config.sdpa_backend, token.device), attention:
        return (step or _step)(model, token, mask, position_ids, cache, cache_position)


def _step(model, token, mask, position_ids, cache, cache_position):
    hidden = model.get_decoder()(
        inputs_embeds=model.get_input_embeddings()(token[:, None]),
        attention_mask=mask,
        position_ids=position_ids,
        cache_position=cache_position,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return model.lm_head(hidden[:, -1])


# Inductor settings of the compiled step. `combo_kernels`: independent small kernels (the step's pointwise work
# beside its GEMMs) launched as one; a replay of the frozen step at 6K batch 32 on one H200 1.56 -> 1.50 ms,
# the full-attention side's 3.17 -> 3.09 ms (benchmarks/RESULTS.md, compressed inference).
_STEP_INDUCTOR_OPTIONS = {"combo_kernels": True}


@functools.cache
def _compiled_step():
    """`_step` under torch.compile, created once per process so its compiled graphs outlive a generate call.
    Static shapes: the static cache's length and the batch are fixed within a call."""
    return torch.compile(_step, dynamic=False, options=_STEP_INDUCTOR_OPTIONS)


def _frozen_step(model, token, mask, position_ids, cache, cache_position):
    """`_step` as a frame of its own, so its frozen graphs and `_compiled_step`'s never stand in for each other
    (torch.compile keeps compiled graphs per code object, and the freezing setting is not among their guards)."""
    return _step(model, token, mask, position_ids, cache, cache_position)


class _FrozenSteps:
    """The frozen compiled step (it compiles with inductor's freezing on), and the state of each model's weights
    when its graphs were built. Torch's guards check which weight tensors a frozen graph was built for, not
    their values: after an in-place change (an optimizer step, load_state_dict) its constants are stale. Then
    the step is made anew from a fresh copy of `_frozen_step`'s code object, which drops every frozen graph,
    and compiles again at its next call."""

    def __init__(self):
        self.step = None
        self.built_for: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model):
        state = _weights_state(model)
        if self.step is None or self.built_for.get(model, state) != state:
            code = _frozen_step.__code__.replace()  # a new code object: no compiled graphs attached
            compiled = torch.compile(
                types.FunctionType(code, _frozen_step.__globals__, _frozen_step.__name__),
                dynamic=False,
                options=_STEP_INDUCTOR_OPTIONS,
            )
            self.step = functools.partial(_call_frozen, compiled)
            self.built_for = weakref.WeakKeyDictionary()
        self.built_for[model] = state
        return self.step


def _call_frozen(compiled, *args):
    """Call a compiled step with inductor's freezing on: compilation happens at the call, and dynamo reads the
    setting there too (weights as constants), so it cannot be one of torch.compile's `options`."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch(freezing=True):
        return compiled(*args)


def _weight_pointers(model) -> tuple[int, ...]:
    """Where every parameter and buffer lives: a captured graph reads them at these addresses."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def _weights_state(model) -> tuple:
    """(version counter, storage address) of every parameter and buffer: an in-place change bumps the first,
    a `.data` swap changes the second. Tensors made under torch.inference_mode keep no version counter."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((-1 if t.is_inference() else t._version, t.data_ptr()) for t in tensors)


_FROZEN_STEPS = _FrozenSteps()


def _unmark_static_addresses(cache: StaticCache) -> None:
    """Make the cache's tensors ordinary inputs of a compiled step. transformers marks them with
    torch._dynamo.mark_static_address (a hint for torch's own CUDA graphs; ours is captured here), and under
    inductor's freezing dynamo bakes such tensors into the graph as attributes: a frozen step would then read
    and write the first call's cache in every later call (tests/test_modeling.py)."""
    for keys, values in _cached_layers(cache):
        for tensor in (keys, values):
            if hasattr(tensor, "_dynamo_static_input_type"):
                del tensor._dynamo_static_input_type


def _cached_layers(cache: DynamicCache):
    """(keys, values) per layer of a DynamicCache or StaticCache, across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a 0/1 mask [B, n] (0 for an all-zero row)."""
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).max(dim=1).values


def _pick(logits, do_sample, temperature, top_k, top_p, suppress, generator) -> torch.Tensor:
    if suppress.numel():
        logits.index_fill_(1, suppress, float("-inf"))
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set with mass >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
