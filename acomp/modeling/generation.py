"""Generation conditioned on summary vectors, with a KV cache.

The softprompt and the prompt are encoded once (the prefill, through transformers' DynamicCache, so a long
context keeps the fast causal kernels); then each new token is decoded against the cache. Positions follow the
model's position rule, so the cached run matches a full forward over [softprompt ; prompt ; generated] token
for token. Decoding modes, all giving the same tokens (tests/modeling/test_modeling.py):

- `dynamic` (the default, any device): the DynamicCache grows by one column per step.
- `static`: the prefill's keys/values are copied into a StaticCache of the final length, and one fixed-shape
  step decodes against it under an additive key mask; with grouped-query attention the step reads each KV head
  once (attention.grouped_decode_attention).
- `cuda_graph`: that step captured once per call in a CUDA graph and replayed. A decode step of a small model
  is hundreds of small kernels; run eagerly, their launches, not memory bandwidth, bound it. With greedy
  decoding the captured step also picks the next token, so the host only replays.

`compile_step=True` (with `static` or `cuda_graph`) runs the step's forward through torch.compile (norms, RoPE,
activations and residual adds fuse); `freeze_weights=True` compiles it with inductor's freezing, which makes
the weights constants of the graph and runs projections that read the same input as one GEMM.
benchmarks/RESULTS.md (compressed inference) has the measured gain of each.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache

from .attention import decode_attention, sdpa_context
from .softprompt import Softprompt, as_softprompt, attention_bias, is_absent, key_bias
from .variable import absent_bias

DECODING_MODES = ("dynamic", "static", "cuda_graph")


@dataclass(frozen=True)
class SamplingOptions:
    """How a token is picked from the next-token logits: the argmax, or (do_sample) a draw from the softmax at
    `temperature`, restricted to the `top_k` most likely tokens and to the smallest set of mass >= `top_p`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids [B] from fp32 logits [B, V]."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > self.top_p  # keep the smallest set with mass >= top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator).squeeze(1)


@dataclass(frozen=True)
class DecodeOptions:
    """How the tokens after the prefill are decoded (module docstring)."""

    decoding: str = "dynamic"
    compile_step: bool = False
    freeze_weights: bool = False

    def check(self, device: torch.device) -> None:
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {self.decoding!r}")
        if self.compile_step and self.decoding == "dynamic":
            raise ValueError(
                "compile_step=True needs decoding='static' or 'cuda_graph' (fixed shapes), got 'dynamic'"
            )
        if self.freeze_weights and not self.compile_step:
            raise ValueError(
                "freeze_weights=True needs compile_step=True (it is a setting of the compiled step)"
            )
        if self.decoding == "cuda_graph" and device.type != "cuda":
            raise ValueError(
                f"decoding='cuda_graph' needs the model and inputs on a CUDA device, got {device}"
            )


@torch.no_grad()
def generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    softprompt: Softprompt | torch.Tensor | None = None,
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
    **removed,
) -> torch.LongTensor:
    """Returns [B, prompt_len + new] token ids. Greedy unless do_sample. Prompts may be padded on either side
    (positions come from the attention mask). `softprompt`: a Softprompt (e.g. `compress_context(...).summary`,
    compacted or not) or a [B, P, d] tensor with its presence bias as `softprompt_bias`. After a sample emits
    EOS it is filled with pad_token_id, and generation stops once every sample has; `eos_token_id=None` takes
    the config's, `[]` generates exactly max_new_tokens. The control tokens `<sum>` / `<eoc>` are never
    generated. `decoding` ('dynamic', 'static', 'cuda_graph'), `compile_step` and `freeze_weights`: see the
    module docstring."""
    if removed:
        raise TypeError(_removed_arguments(removed))
    sampling = SamplingOptions(do_sample, temperature, top_k, top_p, generator)
    options = DecodeOptions(decoding, compile_step, freeze_weights)
    options.check(input_ids.device)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    config = model.config
    batch = input_ids.shape[0]
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos_ids = _ids(config.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids or [0])[0]
    control = [getattr(config, k, None) for k in ("sum_token_id", "eoc_token_id")]
    suppress = list(suppress_token_ids or []) + [t for t in control if t is not None]
    choice = _TokenChoice(sampling, suppress, eos_ids, pad_token_id, batch, device)

    embed = model.get_input_embeddings()
    softprompt = as_softprompt(softprompt, softprompt_bias, batch, embed.weight)
    if softprompt is None:
        softprompt = Softprompt(embed.weight.new_zeros(batch, 0, embed.embedding_dim))
    if not softprompt.length:
        empty = ~attention_mask.bool().any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"sample {int(empty.nonzero()[0])} has no prompt tokens and there are no summary vectors: nothing "
                "to continue from"
            )
    _check_positions(model, softprompt, attention_mask, max_new_tokens)
    _check_window(model, softprompt, attention_mask, max_new_tokens, options.decoding)
    cache, logits = _prefill(model, input_ids, attention_mask, softprompt)
    if max_new_tokens == 0:
        return input_ids
    position = model.position_rule.first_new_position(softprompt.span, attention_mask)
    token = choice(logits)
    if options.decoding == "dynamic":
        decoder = _DynamicDecoder(model, cache, softprompt, attention_mask, token, position, choice)
    else:
        # A fixed-shape step masks the prefill's keys with an additive bias: absent vectors, prompt padding.
        bias = softprompt.bias
        if bias is None:
            bias = torch.zeros(batch, softprompt.length, device=device)
        prefill_bias = key_bias(bias, attention_mask, 0, embed.weight.dtype)
        length = -(-(prefill_bias.shape[1] + max_new_tokens) // 16) * 16  # mask rows 16-aligned for SDPA
        decoder = _StaticDecoder(model, cache, prefill_bias, length, token, position, choice, options)
        del cache  # the static cache holds a copy
    tokens = [token]
    while len(tokens) < max_new_tokens and not choice.all_finished():
        tokens.append(decoder.advance().clone())
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


def _check_positions(
    model, softprompt: Softprompt, attention_mask: torch.Tensor, max_new_tokens: int
) -> None:
    """Learned position embeddings (OPT) end at max_position_embeddings: past them the lookup fails deep in
    the model (on a GPU, as a device-side assert), so say so first. RoPE families run on, at positions they
    never trained on: a warning."""
    limit = getattr(model.config, "max_position_embeddings", None)
    rule = model.position_rule
    if not limit:
        return
    taken = softprompt.span if rule.softprompt_consumes_positions else 0
    prompt = int(attention_mask.sum(dim=1).max()) if attention_mask.numel() else 0
    needed = taken + prompt + max(max_new_tokens - 1, 0)  # the last new token is never fed back
    if needed <= limit:
        return
    message = (
        f"the longest prompt ({prompt} tokens){f' behind {taken} summary positions' if taken else ''} plus "
        f"max_new_tokens={max_new_tokens} needs {needed} positions; the model has {limit}"
    )
    if rule.learned_table:
        raise ValueError(message + " (max_position_embeddings): shorten the prompt or compress it")
    warnings.warn(message + ": positions beyond were never trained on", stacklevel=3)


def _check_window(model, softprompt: Softprompt, attention_mask, max_new_tokens: int, decoding: str) -> None:
    """The fixed-shape step's cache keeps a sliding window (Mistral's `sliding_window`) in rolled order, which
    its key mask, indexed by absolute column, cannot follow: refused where a window binds and the mask matters
    (padding, a presence bias). Unpadded, with no bias, the mask is all zeros and the step is exact."""
    window = getattr(model.config, "sliding_window", None)
    if decoding == "dynamic" or window is None:
        return
    last_query = softprompt.length + attention_mask.shape[1] + max_new_tokens - 2
    masked = softprompt.bias is not None or not bool(attention_mask.bool().all())
    if last_query >= window and masked:
        raise ValueError(
            f"decoding={decoding!r}: the model's sliding window ({window} tokens) binds within "
            f"{last_query + 1} positions and the prompt is padded or the summary has absent vectors; use "
            "decoding='dynamic'"
        )


def _removed_arguments(removed: dict) -> str:
    if "graphs" in removed:
        return "generate() no longer takes graphs= (acomp.DecodeGraphs was removed): each call captures its own step"
    return f"generate() got unexpected keyword argument(s) {sorted(removed)}"


def _ids(token_ids) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


class _TokenChoice:
    """Picks each next token from the logits [B, V] (never a suppressed id), gives samples that have emitted EOS
    the pad id instead, and records which have. `finished` is updated in place, so a captured step can choose."""

    def __init__(self, sampling: SamplingOptions, suppress, eos, pad_token_id: int, batch: int, device):
        self.sampling, self.pad_token_id = sampling, pad_token_id
        # On the device once: indexing with a Python list would copy it to the GPU at every step.
        self.suppress = torch.tensor(suppress, dtype=torch.long, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.suppress.numel():
            logits.index_fill_(1, self.suppress, float("-inf"))
        token = self.sampling.pick(logits).masked_fill(self.finished, self.pad_token_id)
        if self.eos.numel():
            self.finished |= (token[:, None] == self.eos).any(dim=1)
        return token

    def all_finished(self) -> bool:
        """Whether every sample has emitted EOS (a read from the device; never true without EOS ids)."""
        return bool(self.eos.numel()) and bool(self.finished.all())


def _prefill(model, input_ids, attention_mask, softprompt: Softprompt):
    """(DynamicCache of [softprompt ; prompt], the next token's logits [B, V]). Absent softprompt vectors are
    masked through an additive bias on their keys."""
    batch, prompt_len = input_ids.shape
    embeds = torch.cat([softprompt.vectors, model.get_input_embeddings()(input_ids)], dim=1)
    if softprompt.bias is None:
        mask = torch.cat([attention_mask.new_ones(batch, softprompt.length), attention_mask], dim=1)
    else:
        window = getattr(model.config, "sliding_window", None)
        mask = attention_bias(softprompt.bias, attention_mask, 0, embeds.dtype, window)
    positions = model.position_rule.segment(softprompt.span, attention_mask, 0, softprompt.positions)
    cache = DynamicCache()
    with sdpa_context(model.config.sdpa_backend, input_ids.device):
        hidden = model.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    # The next token is predicted at each sample's last real prompt token (the last column under left padding),
    # or, for a sample whose prompt is empty (all padding), at its last present summary vector.
    last = softprompt.length + _last_true_index(attention_mask) if prompt_len else None
    if softprompt.length:  # generate() refused a sample with neither prompt tokens nor summary vectors
        present = torch.ones(batch, softprompt.length, dtype=torch.bool, device=input_ids.device)
        if softprompt.bias is not None:
            present = ~is_absent(softprompt.bias)
        on_summary = _last_true_index(present)
        last = on_summary if last is None else torch.where(attention_mask.bool().any(dim=1), last, on_summary)
    return cache, model.lm_head(hidden[torch.arange(batch, device=input_ids.device), last])


class _DynamicDecoder:
    """Decode steps on the prefill's DynamicCache: the 2D mask (or, with a softprompt bias, the additive key
    bias) grows by one column per step."""

    def __init__(self, model, cache, softprompt: Softprompt, attention_mask, token, position, choice):
        self.model, self.cache, self.token, self.position, self.choice = model, cache, token, position, choice
        batch = token.shape[0]
        self.mask = torch.cat([attention_mask.new_ones(batch, softprompt.length), attention_mask], dim=1)
        self.bias = None
        self.window = getattr(model.config, "sliding_window", None)  # the bias path applies it itself
        if softprompt.bias is not None:
            dtype = model.get_input_embeddings().weight.dtype
            self.bias = key_bias(softprompt.bias, attention_mask, 0, dtype)[:, None, None, :]

    def advance(self) -> torch.Tensor:
        """Decode the last token; returns the next one."""
        batch = self.token.shape[0]
        if self.bias is None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(batch, 1)], dim=1)
            mask = self.mask
        else:
            self.bias = torch.cat([self.bias, self.bias.new_zeros(batch, 1, 1, 1)], dim=-1)
            query = self.bias.shape[-1] - 1
            if self.window is not None and query >= self.window:  # keys `window` or more columns back
                self.bias[..., : query - self.window + 1] = absent_bias(self.bias.dtype)
            mask = self.bias
        logits = _next_logits(
            self.model, _decode_forward, self.token, mask, self.position[:, None], self.cache
        )
        self.position = self.position + 1
        self.token = self.choice(logits)
        return self.token


class _StaticDecoder:
    """The fixed-shape decode step: a StaticCache of `length` columns holding the prefill's keys/values, an
    additive key mask [B, 1, 1, length], and device buffers for the token, its position and its cache column.
    The step opens its key column and advances the positions itself, and with greedy decoding picks the next
    token too, so with `cuda_graph` it is captured at its first call and then only replayed."""

    def __init__(self, model, prefill_cache, prefill_bias, length, token, position, choice, options):
        batch, prefill_len = prefill_bias.shape
        dtype, device = prefill_bias.dtype, prefill_bias.device
        self.model, self.choice = model, choice
        self.cache = StaticCache(
            config=model.config, max_cache_len=length, max_batch_size=batch, device=device, dtype=dtype
        )
        columns = torch.arange(prefill_len, device=device)
        for layer, (keys, values) in enumerate(_cached_layers(prefill_cache)):
            self.cache.update(keys, values, layer, {"cache_position": columns})
        _unmarked(self.cache)
        self.mask = torch.full((batch, 1, 1, length), absent_bias(dtype), dtype=dtype, device=device)
        self.mask[:, 0, 0, :prefill_len] = prefill_bias
        self.token = token.clone()
        self.position = position[:, None].clone()
        self.cache_position = torch.full((1,), prefill_len, dtype=torch.long, device=device)
        self.decode_forward = _decode_forward_for(model, options)
        self.greedy = not choice.sampling.do_sample  # sampling draws from its generator outside a graph
        self.use_graph = options.decoding == "cuda_graph"
        self.graph = self.logits = None

    def advance(self) -> torch.Tensor:
        """Decode the last token; returns the buffer holding the next one."""
        if not self.use_graph:
            logits = self._decode_step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        if not self.greedy:
            self.token.copy_(self.choice(logits))
        return self.token

    def _decode_step(self) -> torch.Tensor:
        """One decode step on the buffers: the part a CUDA graph captures (logits [B, V])."""
        self.mask.index_fill_(-1, self.cache_position, 0.0)
        inputs = (self.token, self.mask, self.position, self.cache, self.cache_position)
        logits = _next_logits(self.model, self.decode_forward, *inputs, grouped=True)
        self.position += 1
        self.cache_position += 1
        if self.greedy:
            self.token.copy_(self.choice(logits))
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream (as torch's CUDA graph docs ask; a compiled step compiles here), then capture.
        # The warm-up is this step run once: it writes the same keys/values the first replay writes again, and
        # the buffers it advances are restored before the capture.
        state = [self.token, self.position, self.cache_position, self.choice.finished]
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode_step()
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._decode_step()


def _next_logits(model, forward, token, mask, position_ids, cache, cache_position=None, grouped=False):
    """Next-token logits [B, V] of one decode step (`forward`: `_decode_forward` or a compiled one). `grouped`: the
    grouped-query decode attention, for the static key mask. The attention and SDPA settings are entered outside
    the step, since a compiled step compiles at the call."""
    config = model.config
    attention = decode_attention(config) if grouped else contextlib.nullcontext()
    with sdpa_context(config.sdpa_backend, token.device), attention:
        return forward(model, token, mask, position_ids, cache, cache_position)


def _decode_forward(model, token, mask, position_ids, cache, cache_position):
    hidden = model.get_decoder()(
        inputs_embeds=model.get_input_embeddings()(token[:, None]),
        attention_mask=mask,
        position_ids=position_ids,
        cache_position=cache_position,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return model.lm_head(hidden[:, -1])


def _frozen_decode_forward(model, token, mask, position_ids, cache, cache_position):
    """`_decode_forward` as a frame of its own: torch.compile keeps compiled graphs per code object, and the
    freezing setting is not among their guards, so frozen and plain compiled graphs must not share one."""
    return _decode_forward(model, token, mask, position_ids, cache, cache_position)


@functools.cache
def _compiled(forward):
    """`forward` under torch.compile, made once per process so its graphs outlive a call. Static shapes: the batch
    and the static cache's length are fixed within a call; each new pair compiles once, up to torch's
    recompile limit (`torch._dynamo.config.recompile_limit`), after which new shapes run eager."""
    return torch.compile(forward, dynamic=False)


# The weights each model's frozen graphs were compiled from (`_weights_state`).
_FROZEN_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_forward_for(model, options: DecodeOptions):
    """The forward of a decode step as `options` ask for: eager, compiled, or compiled with frozen weights. A
    frozen graph holds copies of the weights taken when it compiled, and torch's guards check which tensors
    they came from, not their values: once a model's weights changed in place (an optimizer step,
    load_state_dict), torch.compiler.reset() drops every compiled graph of the process, and the step compiles
    again."""
    if not options.compile_step:
        return _decode_forward
    if not options.freeze_weights:
        return _compiled(_decode_forward)
    state = _weights_state(model)
    if _FROZEN_WEIGHTS.get(model, state) != state:
        torch.compiler.reset()
        _FROZEN_WEIGHTS.clear()
    _FROZEN_WEIGHTS[model] = state
    return functools.partial(_call_frozen, _compiled(_frozen_decode_forward))


def _call_frozen(compiled, *args):
    """Call a compiled step with inductor's freezing on: compilation happens at the call, and dynamo reads the
    setting there too, so it cannot be one of torch.compile's `options`."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch(freezing=True):
        return compiled(*args)


def _weights_state(model) -> tuple:
    """(version counter, storage address) of every parameter and buffer: an in-place change bumps the first,
    a `.data` swap changes the second. Tensors made under torch.inference_mode keep no version counter."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((-1 if t.is_inference() else t._version, t.data_ptr()) for t in tensors)


def _unmarked(cache: StaticCache) -> None:
    """Give the cache's layers views of their tensors, which a compiled step reads as ordinary inputs.
    transformers marks the tensors it allocates with torch._dynamo.mark_static_address (a hint for torch's own
    CUDA graphs; ours is captured here), and with inductor's freezing dynamo bakes such tensors into the graph:
    a frozen step would read and write the first call's cache in every later call. A view carries no mark."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.view_as(layer.keys), layer.values.view_as(layer.values)
    else:
        cache.key_cache = [t.view_as(t) for t in cache.key_cache]
        cache.value_cache = [t.view_as(t) for t in cache.value_cache]


def _cached_layers(cache: DynamicCache):
    """(keys, values) per layer of a DynamicCache, across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a 0/1 mask [B, n] (0 for an all-zero row)."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).max(dim=1).values
