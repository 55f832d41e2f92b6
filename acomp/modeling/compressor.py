"""The AutoCompressor core: a segment loop around an unmodified transformers causal LM.

A call splits its input into segments. Each segment runs through the base decoder as
`[softprompt ; segment tokens ; summary tokens]` (via `inputs_embeds`, `position_ids` and an attention
mask; no modeling code is copied). The final hidden states at the summary-token positions are that
segment's summary vectors; with accumulation the softprompt of segment k is every summary vector of
segments < k (plus whatever softprompt the caller passed in). Loss and logits cover text tokens only:
shifted cross-entropy over the concatenation of all segments of the call, so the last token of segment
k predicts the first token of segment k+1 (exactly the original's objective).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig
from transformers.utils import ModelOutput

from .attention import causal_attention_block, folds_presence, resolve_attn_implementation, sdpa_context
from .config import apply_compression_fields, init_std
from .generation import generate
from .positions import PositionRule
from .softprompt import Softprompt, as_softprompt, attention_bias, key_bias
from .variable import (
    hard_lengths,
    hard_presence_bias,
    length_penalty,
    sampled_presence,
    soft_presence,
    stop_probabilities,
)

IGNORE_INDEX = -100

# Keyword arguments of from_pretrained that also apply when we load the config ourselves.
_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "trust_remote_code",
    "subfolder",
)


@dataclass
class AutoCompressorOutput(ModelOutput):
    """loss: mean shifted CE over the call's text tokens. logits: text positions only, all segments.
    summary: the Softprompt to pass to a later call (when output_softprompt=True): its vectors are `softprompt`
    [B, P, d], its presence bias `softprompt_bias` (variable-length mode); `summary.compact()` keeps only the
    present vectors. segment_nll / segment_tokens: [B, num_segments] summed NLL and target counts per segment (a
    segment's targets are the tokens after each of its positions, as in the original's metrics)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    softprompt: torch.Tensor | None = None
    segment_nll: torch.Tensor | None = None
    segment_tokens: torch.Tensor | None = None
    # Variable-length mode only (see variable.py):
    softprompt_bias: torch.Tensor | None = None  # [B, P] additive log-presence of each softprompt vector
    summary_lengths: torch.Tensor | None = None  # [B, compressing segments]: E[L] (training) or L (inference)
    lm_loss: torch.Tensor | None = None  # loss without the length penalty
    length_penalty: torch.Tensor | None = None
    summary: Softprompt | None = None


@dataclass
class SegmentOutput:
    """What one segment's decoder pass gives the segment loop."""

    logits: torch.Tensor | None  # [B, n, V] text logits (when asked for)
    summary: torch.Tensor | None  # [B, T, d] its summary vectors (a compressing segment)
    nll: torch.Tensor | None  # [B] summed NLL of its targets (with labels)
    tokens: torch.Tensor | None  # [B] its target count (with labels)
    stop_prob: torch.Tensor | None  # [B, T] each slot's stop probability (variable mode)
    stop_logits: torch.Tensor | None  # [B, T, V] the LM head over the slots (variable mode)


def split_lengths(total: int, segment_lengths) -> list[int]:
    """Normalise `segment_lengths` (None, int or list) to a list that sums to `total`."""
    if segment_lengths is None:
        return [total]
    if isinstance(segment_lengths, int) and not isinstance(segment_lengths, bool):
        if segment_lengths <= 0:
            raise ValueError(f"segment_lengths must be positive, got {segment_lengths}")
        full, rest = divmod(total, segment_lengths)
        return [segment_lengths] * full + ([rest] if rest else [])
    lengths = [int(x) for x in segment_lengths]
    if not lengths or any(x <= 0 for x in lengths):
        raise ValueError(f"segment_lengths must be positive integers, got {list(segment_lengths)}")
    if sum(lengths) != total:
        raise ValueError(f"segment_lengths {lengths} sum to {sum(lengths)}, but the input has {total} tokens")
    return lengths


class AutoCompressorMixin:
    """Mixed into a transformers `*ForCausalLM` class; see the module docstring.

    Subclasses set `position_rule`. The base class's own forward is never called: we drive its
    decoder (`get_decoder()`) and `lm_head` directly.
    """

    position_rule: PositionRule

    def __init__(self, config, *args, **kwargs):
        apply_compression_fields(config)
        super().__init__(config, *args, **kwargs)
        if self.variable_length and config._attn_implementation == "flash_attention_2":
            raise ValueError(
                "compression_mode='variable' needs an additive attention bias: use 'sdpa' or 'eager'"
            )
        if (
            self.variable_length
            and config.presence_attention == "folded"
            and config._attn_implementation != "sdpa"
        ):
            raise ValueError(
                f"presence_attention='folded' needs attn_implementation 'sdpa', not {config._attn_implementation!r}"
            )
        width = self.get_input_embeddings().embedding_dim
        self.embed_summary = nn.Embedding(self.num_summary_slots, width)
        self.chunked_loss = ChunkedNLL()  # no parameters: adds nothing to checkpoints
        self.init_summary_embeddings()
        if self.variable_length and self.get_input_embeddings().weight.device.type != "meta":
            self.add_control_tokens()

    # ----------------------------------------------------------------------------------- set-up
    @property
    def summary_length(self) -> int:
        return self.config.summary_length

    @property
    def variable_length(self) -> bool:
        return self.config.compression_mode == "variable"

    @property
    def num_summary_slots(self) -> int:
        """Rows of embed_summary: summary_length (fixed) or compression_max_len (variable)."""
        return self.config.compression_max_len if self.variable_length else self.config.summary_length

    def add_control_tokens(self, sum_token_id: int | None = None, eoc_token_id: int | None = None) -> None:
        """Give `<sum>` and `<eoc>` embedding rows and record their ids in the config.

        Ids already in the config are kept. Otherwise the given ids (e.g. a tokenizer's) are used, or two
        rows are appended after the current table (never shrinking it: OPT's table is larger than its
        tokenizer). New rows start from the EOS embedding. ZeRO-3 safe (transformers gathers on resize).
        """
        config = self.config
        sum_id = getattr(config, "sum_token_id", None)
        eoc_id = getattr(config, "eoc_token_id", None)
        if sum_id is not None and eoc_id is not None:
            return
        rows = self.get_input_embeddings().weight.shape[0]
        sum_id = rows if sum_token_id is None else sum_token_id
        eoc_id = sum_id + 1 if eoc_token_id is None else eoc_token_id
        needed = max(rows, sum_id + 1, eoc_id + 1)
        if needed > rows:
            self.resize_token_embeddings(needed, mean_resizing=False)
        config.sum_token_id, config.eoc_token_id = sum_id, eoc_id
        eos = (
            config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
        )
        if eos is not None:
            weight = self.get_input_embeddings().weight
            with torch.no_grad(), _gathered([weight]):
                weight[[sum_id, eoc_id]] = weight[eos].clone()

    def init_stop_row(self) -> None:
        """Zero the LM head's `<eoc>` row: the variable mode's stop logit starts as that of an untrained row.

        A base pretrained with `<eoc>` in its vocabulary has learned never to predict it (a stop probability
        about 30x below a fresh row's in benchmarks/RESULTS.md), and the length penalty's gradient on a stop
        logit scales with p, so lengths would not answer the penalty for hundreds of steps. Called wherever a
        new summary table is initialised in variable mode; under tied embeddings this is also the `<eoc>`
        input row, which no input ever uses. A no-op while the row does not exist yet (the trainer resizes the
        table to its corpus after loading, then calls this again). ZeRO-3 safe."""
        head = self.get_output_embeddings().weight
        with torch.no_grad(), _gathered([head]):
            if self.config.eoc_token_id < head.shape[0]:
                head[self.config.eoc_token_id] = 0.0

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """As transformers saves, minus an empty summary table (summary_length 0, a plain LM), so the
        checkpoint loads as a base model with any summary_length."""
        if self.num_summary_slots == 0:
            state_dict = self.state_dict() if state_dict is None else state_dict
            state_dict = {k: v for k, v in state_dict.items() if not k.endswith("embed_summary.weight")}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @torch.no_grad()
    def init_summary_embeddings(self) -> None:
        """Initialise a new summary table as `config.summary_init` says: every row the EOS token's input
        embedding (the paper's init), or N(0, the base's init std) rows.

        Must run after the base weights are loaded (the original copied EOS before, so the copy was lost);
        `from_pretrained` calls it when the checkpoint has no `embed_summary.weight`. Works on
        ZeRO-3 partitioned parameters by gathering them first.
        """
        if self.num_summary_slots == 0:
            return
        source = self.get_input_embeddings().weight
        target = self.embed_summary.weight
        if source.device.type == "meta" or target.device.type == "meta":
            return  # weights not materialised yet; from_pretrained comes back here after loading
        if self.config.summary_init == "normal":
            with _gathered([target]):
                target.normal_(0.0, init_std(self.config))
            return
        eos = self.config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None:
            return  # keep the random init: there is no EOS row to copy
        with _gathered([source, target]):
            if target.numel() and eos < source.shape[0]:
                target.copy_(source[eos].to(target.dtype).expand_as(target))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a base model or an AutoCompressor checkpoint (hub name or local directory).

        Compression fields (summary_length, accumulate_summary, ...) may be passed as keyword
        arguments; they override the checkpoint's. `attn_implementation` defaults to 'sdpa'.
        """
        from .config import COMPRESSION_DEFAULTS

        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in COMPRESSION_DEFAULTS}
        config = kwargs.pop("config", None)
        if config is None:
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        apply_compression_fields(config, **fields)
        kwargs["attn_implementation"] = resolve_attn_implementation(kwargs.get("attn_implementation"))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, output_loading_info=True, **kwargs
        )
        new_summary = "embed_summary.weight" in info["missing_keys"]
        if new_summary:
            model.init_summary_embeddings()
        if model.variable_length:
            model.add_control_tokens()
            if new_summary:
                model.init_stop_row()
        return (model, info) if want_info else model

    # ---------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        segment_lengths=None,
        softprompt: Softprompt | torch.Tensor | None = None,
        output_softprompt: bool = False,
        return_logits: bool = True,
        softprompt_bias: torch.Tensor | None = None,
        hard_stop: bool | None = None,
        return_dict: bool = True,
        **unused,
    ) -> AutoCompressorOutput:
        """Run the segment loop. See the module docstring for the semantics of each output.

        `softprompt`: summary vectors to condition on, a Softprompt (an earlier call's `summary`) or a
        [B, P, d] tensor, whose presence bias [B, P] may come as `softprompt_bias`. Variable-length mode only:
        `hard_stop` picks inference-style stopping (default: when not training).
        """
        unused.pop("use_cache", None)
        if unused:
            raise TypeError(f"unexpected forward argument(s): {sorted(unused)}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, total, _ = inputs_embeds.shape
        unpadded = attention_mask is None  # no padding to mask: segments may skip the mask (_segment)
        if attention_mask is None:
            attention_mask = torch.ones(batch, total, dtype=torch.long, device=inputs_embeds.device)
        if attention_mask.shape != (batch, total):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, total)}"
            )
        lengths = split_lengths(total, segment_lengths)
        memory = as_softprompt(softprompt, softprompt_bias, batch, inputs_embeds)
        targets = None
        if labels is not None:
            if labels.shape != (batch, total):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(batch, total)}")
            targets = next_token_targets(labels, attention_mask)
        hard_stop = (not self.training) if hard_stop is None else hard_stop
        tail_embeds = self._summary_embeds(batch, inputs_embeds.dtype)
        checkpointing = (
            self.config.segment_gradient_checkpointing and self.training and torch.is_grad_enabled()
        )

        segments: list[SegmentOutput] = []
        summary_lengths, penalties = [], []
        start = 0
        for i, n in enumerate(lengths):
            last = i == len(lengths) - 1
            text = slice(start, start + n)
            compress = tail_embeds is not None and (not last or output_softprompt)
            args = (
                memory,
                inputs_embeds[:, text],
                attention_mask[:, text],
                None if targets is None else targets[:, text],
                tail_embeds if compress else None,
                return_logits,
                unpadded,
            )
            if checkpointing and not last:
                seg = checkpoint(self._segment, *args, use_reentrant=False)
            else:
                seg = self._segment(*args)
            segments.append(seg)
            if seg.summary is not None:
                new = Softprompt(seg.summary)
                if self.variable_length:
                    new.bias, length = self._presence(seg.stop_prob, seg.stop_logits, hard_stop)
                    summary_lengths.append(length)
                    penalties.append(
                        length_penalty(
                            length,
                            attention_mask[:, text].sum(dim=1),
                            self.config.compression_lambda,
                            self.config.compression_alpha,
                        )
                    )
                accumulate = self.config.accumulate_summary and memory is not None
                memory = memory.extend(new) if accumulate else new
            start += n

        loss = lm_loss = penalty = segment_nll = segment_tokens = None
        if penalties:
            penalty = torch.stack(penalties, dim=1).mean()
        if targets is not None:
            segment_nll = torch.stack([s.nll for s in segments], dim=1)
            segment_tokens = torch.stack([s.tokens for s in segments], dim=1)
            loss = lm_loss = segment_nll.sum() / segment_tokens.sum().clamp(min=1)
            if penalty is not None and self.config.compression_lambda:
                loss = lm_loss + penalty
        summary = memory if output_softprompt else None
        out = AutoCompressorOutput(
            loss=loss,
            logits=torch.cat([s.logits for s in segments], dim=1) if return_logits else None,
            softprompt=None if summary is None else summary.vectors,
            segment_nll=segment_nll,
            segment_tokens=segment_tokens,
            softprompt_bias=None if summary is None else summary.bias,
            summary_lengths=torch.stack(summary_lengths, dim=1) if summary_lengths else None,
            lm_loss=lm_loss,
            length_penalty=penalty,
            summary=summary,
        )
        return out if return_dict else out.to_tuple()

    def _segment(
        self,
        softprompt: Softprompt | None,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        targets: torch.Tensor | None,
        tail_embeds: torch.Tensor | None,
        return_logits: bool,
        unpadded: bool = False,
    ) -> SegmentOutput:
        """One segment: decoder over [softprompt ; text ; tail], where the tail is the summary tokens
        (fixed mode) or `<sum>` plus the compression slots (variable mode). `unpadded`: the caller passed no
        attention mask, so under SDPA attention is purely causal apart from a presence bias."""
        batch, n, _ = text_embeds.shape
        num_tail = 0 if tail_embeds is None else tail_embeds.shape[1]
        if softprompt is None:
            softprompt = Softprompt(text_embeds[:, :0])
        soft_len = softprompt.length
        parts = [p for p in (softprompt.vectors, text_embeds, tail_embeds) if p is not None]
        embeds = torch.cat(parts, dim=1)
        positions = self.position_rule.segment(softprompt.span, text_mask, num_tail, softprompt.positions)
        extra = {}
        window = getattr(self.config, "sliding_window", None)
        unwindowed = window is None or embeds.shape[1] <= window  # no sliding window binds within this call
        if softprompt.bias is None and unpadded and unwindowed and self.config._attn_implementation == "sdpa":
            # No mask for transformers to check: the causal kernel, without the host sync of its all-ones check
            # on a 2D mask (one per decoder call) and without the 4D mask it builds from position_ids when
            # given None (causal_attention; OPT still builds its causal one, which goes unused).
            mask = None
        elif softprompt.bias is None:
            ones = text_mask.new_ones
            mask = torch.cat([ones(batch, soft_len), text_mask, ones(batch, num_tail)], dim=1)
        elif folds_presence(self.config) and unwindowed:  # the same bias on the keys, causal kernels
            mask, extra = None, {"key_bias": key_bias(softprompt.bias, text_mask, num_tail, torch.float32)}
        else:
            mask = attention_bias(
                softprompt.bias, text_mask, num_tail, embeds.dtype, None if unwindowed else window
            )
        attention = causal_attention_block(self.config) if mask is None else contextlib.nullcontext()
        with sdpa_context(self.config.sdpa_backend, embeds.device), attention:
            hidden = self.get_decoder()(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, **extra
            ).last_hidden_state
        text_hidden = hidden[:, soft_len : soft_len + n]
        summary = stop_prob = stop_logits = None
        if num_tail:
            summary = hidden[:, soft_len + n :]
            if self.variable_length:
                summary = summary[:, 1:]  # the <sum> trigger's own output is not a summary vector
                stop_logits = self.lm_head(summary)
                stop_prob = stop_probabilities(stop_logits, self.config.eoc_token_id)
        seg_logits = seg_nll = seg_count = None
        if return_logits:
            seg_logits = self.lm_head(text_hidden)
        if targets is not None:
            if seg_logits is not None:
                seg_nll = summed_nll(seg_logits, targets)
            else:  # the loss only: never keep [tokens, vocab] logits (see chunked_nll)
                seg_nll = self.chunked_loss(self.lm_head, text_hidden, targets, self.config.loss_chunk_size)
            seg_count = (targets != IGNORE_INDEX).sum(dim=1)
        return SegmentOutput(seg_logits, summary, seg_nll, seg_count, stop_prob, stop_logits)

    def _presence(self, stop_prob, stop_logits, hard: bool):
        """(bias [B, T], length [B]) of a segment's new vectors: hard (inference), or in training sampled or soft
        (`training_presence`)."""
        if hard:
            c = self.config
            length = hard_lengths(
                stop_prob, stop_logits, c.eoc_token_id, c.compress_stop_threshold, c.compress_stop_rule
            )
            return hard_presence_bias(length, stop_prob.shape[1], torch.float32), length.float()
        if self.config.training_presence == "sampled":
            return sampled_presence(stop_prob)
        return soft_presence(stop_prob)

    def _summary_embeds(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The tail appended to a compressing segment (None when compression is off)."""
        if self.num_summary_slots == 0:
            return None
        # Call the module (not .weight) so wrappers such as peft's modules_to_save are honoured.
        ids = torch.arange(self.num_summary_slots, device=self.embed_summary.weight.device)
        tail = self.embed_summary(ids).to(dtype)
        if self.variable_length:
            trigger = torch.tensor([self.config.sum_token_id], device=ids.device)
            tail = torch.cat([self.get_input_embeddings()(trigger).to(dtype), tail], dim=0)
        return tail.unsqueeze(0).expand(batch, -1, -1)

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def compress(self, input_ids, attention_mask=None, segment_lengths=None, softprompt=None) -> torch.Tensor:
        """Summary vectors [B, P, d] of a context (plus any softprompt passed in, when accumulating).
        In variable-length mode use `compress_context`, which also returns which vectors are present."""
        return self(
            input_ids,
            attention_mask=attention_mask,
            segment_lengths=segment_lengths,
            softprompt=softprompt,
            output_softprompt=True,
            return_logits=False,
        ).softprompt

    @torch.no_grad()
    def compress_context(
        self, input_ids, attention_mask=None, segment_lengths=None, softprompt=None, softprompt_bias=None
    ) -> AutoCompressorOutput:
        """Compress a context with inference-style stopping. Returns the output with `summary` (a Softprompt:
        in variable mode its bias is 0 = present, large negative = absent; `summary.compact()` drops the absent
        vectors), the same as `softprompt` / `softprompt_bias`, and `summary_lengths`."""
        return self(
            input_ids,
            attention_mask=attention_mask,
            segment_lengths=segment_lengths,
            softprompt=softprompt,
            softprompt_bias=softprompt_bias,
            output_softprompt=True,
            return_logits=False,
            hard_stop=True,
        )

    def generate(self, input_ids, attention_mask=None, softprompt=None, **kwargs):
        """Generate after a prompt, conditioned on summary vectors, with a KV cache. See generation.py."""
        return generate(self, input_ids, attention_mask=attention_mask, softprompt=softprompt, **kwargs)


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per sample [B] of logits [B, n, V] against targets [B, n] (fp32 softmax)."""
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape).sum(dim=1)


def _head_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return summed_nll(head(hidden), targets)


def chunked_nll(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int, chunks: int | None = None
) -> torch.Tensor:
    """`summed_nll(head(hidden), targets)` without materialising the logits of all tokens.

    The LM head and the cross-entropy run over slices of at most `chunk_tokens` tokens (batch x positions).
    Under autograd each slice is checkpointed (non-reentrant, so ZeRO-3 hooks work): its logits, fp32 copy
    and log-softmax are freed after the forward and recomputed in backward, one slice at a time. Costs one
    extra LM-head forward (2 V d FLOPs per token); saves ~10 bytes x V per token of activation memory (the
    bf16 logits, their fp32 copy and the saved log-probabilities). `chunk_tokens` 0 = one unchunked pass.
    `chunks`: cut the positions into at least this many (near-equal) slices, so that segments of different
    lengths call the head equally often (ChunkedNLL says why).
    """
    batch, n = targets.shape
    if chunk_tokens <= 0:
        return _head_nll(head, hidden, targets)
    pieces = max(chunks or 0, loss_slices(chunk_tokens, batch, n))
    if pieces == 0:  # zero-length segment
        return hidden.new_zeros(batch, dtype=torch.float32)
    needs_graph = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    total = None
    for part_hidden, part_targets in zip(
        hidden.tensor_split(pieces, dim=1), targets.tensor_split(pieces, dim=1)
    ):
        args = (head, part_hidden, part_targets)
        part = checkpoint(_head_nll, *args, use_reentrant=False) if needs_graph else _head_nll(*args)
        total = part if total is None else total + part
    return total


def loss_slices(chunk_tokens: int, batch: int, positions: int) -> int:
    """The slices `chunked_nll` needs for `positions` positions of `batch` sequences (at most `chunk_tokens`
    tokens each)."""
    return math.ceil(positions / max(1, chunk_tokens // max(batch, 1)))


class ChunkedNLL(nn.Module):
    """`chunked_nll` as a (parameter-less) module. Being a module matters under ZeRO-3: DeepSpeed hooks the
    module's output, so in backward the module is active before any chunk is recomputed, and a frozen LM
    head (LoRA) gathered for that recompute stays gathered until the module's backward is done. Called as a
    plain function, DeepSpeed re-partitions the frozen head weight at the end of the recompute's LM-head
    forward, before the chunk's backward uses it (torch's CheckpointError: shape [V, d] saved, [0] recomputed).

    `chunks` (set by the trainer under ZeRO-3, not saved) fixes the number of slices per segment: ZeRO-3
    prefetches weights by the order of module calls it traced, and drops that trace whenever a pass calls
    modules in another order, so the number of LM-head calls must not follow the segment length (random
    boundaries) or differ between ranks. None: as many slices as `chunk_tokens` needs."""

    chunks: int | None = None

    def forward(self, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int):
        return chunked_nll(head, hidden, targets, chunk_tokens, self.chunks)


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = labels[:, t + 1]; ignored where either position is padding, and at the end."""
    pad = attention_mask == 0
    targets = F.pad(labels.masked_fill(pad, IGNORE_INDEX)[:, 1:], (0, 1), value=IGNORE_INDEX)
    return targets.masked_fill(pad, IGNORE_INDEX)


@contextlib.contextmanager
def _gathered(params):
    """Within the block, ZeRO-3 partitioned `params` are whole (deepspeed.zero.GatheredParameters; rank 0's
    changes are kept); other parameters are left as they are."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield
