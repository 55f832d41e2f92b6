"""The softprompt a call conditions on: summary vectors, which of them are present, and the masks built from it.

A `Softprompt` holds the summary vectors [B, P, d] and, in the variable-length mode, their additive presence
bias [B, P] (0 = present; the absent bias removes a vector; soft presence's values in between). At inference
a variable-length model keeps L <= compression_max_len vectors per segment, yet the output still holds every
slot, the absent ones masked. `compact()` drops them, so a saved summary, a KV cache and every decode step
hold only the kept vectors. RoPE families number the softprompt's positions (positions.py), so a compacted
softprompt remembers where each kept vector was (`positions`) and how many positions the whole softprompt
took (`span`): the text still follows at the same positions, and the logits are those of the masked layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .variable import absent_bias


@dataclass
class Softprompt:
    """Summary vectors to condition on. `bias` None: every vector is present. `positions` None: the vectors
    sit at 0..P-1 and take P positions; after `compact()`, [B, P] positions of the kept vectors among the
    `span` positions the softprompt took before (the text follows them)."""

    vectors: torch.Tensor  # [B, P, d]
    bias: torch.Tensor | None = None  # [B, P] additive log-presence (variable-length mode)
    positions: torch.Tensor | None = None  # [B, P] long
    span: int | None = None  # positions taken before the text; None = P

    def __post_init__(self):
        if self.span is None:
            self.span = self.vectors.shape[1]

    @property
    def length(self) -> int:
        """Vectors per sample (P)."""
        return self.vectors.shape[1]

    def slot_positions(self) -> torch.Tensor:
        """[B, P] position of each vector: `positions`, or 0..P-1."""
        if self.positions is not None:
            return self.positions
        batch, length = self.vectors.shape[:2]
        return torch.arange(length, device=self.vectors.device).expand(batch, -1)

    def extend(self, new: Softprompt) -> Softprompt:
        """This softprompt followed by `new` (the next segment's vectors, at the positions after `span`)."""
        bias = None
        if self.bias is not None or new.bias is not None:
            bias = torch.cat([_bias_or_zeros(self, new.bias), _bias_or_zeros(new, self.bias)], dim=1)
        positions = None
        if self.positions is not None or new.positions is not None:
            positions = torch.cat([self.slot_positions(), self.span + new.slot_positions()], dim=1)
        return Softprompt(
            torch.cat([self.vectors, new.vectors], dim=1), bias, positions, self.span + new.span
        )

    def compact(self) -> Softprompt:
        """Only the present vectors of each sample, in order, padded to the batch's longest: a bias remains only
        where samples differ (their padding) or presence is soft; one sample, or equal hard lengths, has none.
        Gives the logits and tokens of the masked softprompt (tests/modeling/test_variable.py)."""
        if self.bias is None:
            return self
        present = ~is_absent(self.bias)
        counts = present.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        # Present slots first, each group in its original order.
        order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        padding = torch.arange(width, device=order.device) >= counts[:, None]
        vectors = self.vectors.gather(1, order[..., None].expand(-1, -1, self.vectors.shape[-1]))
        vectors = vectors.masked_fill(padding[..., None], 0.0)
        bias = self.bias.gather(1, order).masked_fill(padding, absent_bias(self.bias.dtype))
        if not bool(bias.any()):
            bias = None
        return Softprompt(vectors, bias, self.slot_positions().gather(1, order), self.span)

    def detach(self) -> Softprompt:
        """The same softprompt with no gradient path back to the call that made it (truncated BPTT)."""
        bias = None if self.bias is None else self.bias.detach()
        return Softprompt(self.vectors.detach(), bias, self.positions, self.span)

    def to(self, device) -> Softprompt:
        """The same softprompt on `device`."""
        bias, positions = (None if t is None else t.to(device) for t in (self.bias, self.positions))
        return Softprompt(self.vectors.to(device), bias, positions, self.span)


def is_absent(bias: torch.Tensor) -> torch.Tensor:
    """Which entries of a presence bias remove their vector: at or below float16's lowest value, where a key's
    attention weight is zero in every float type (the absent bias of any dtype, or -inf)."""
    return bias.float() <= torch.finfo(torch.float16).min


def _bias_or_zeros(softprompt: Softprompt, other: torch.Tensor | None) -> torch.Tensor:
    if softprompt.bias is not None:
        return softprompt.bias
    return torch.zeros(softprompt.vectors.shape[:2], device=other.device, dtype=other.dtype)


def as_softprompt(softprompt, bias, batch: int, embedding: torch.Tensor) -> Softprompt | None:
    """A call's `softprompt=` (a Softprompt or a [B or 1, P, d] tensor) and `softprompt_bias=` (only with a
    tensor) as one Softprompt in the embeddings' dtype, expanded to `batch`; None when it holds no vector."""
    if isinstance(softprompt, Softprompt):
        if bias is not None:
            raise ValueError("softprompt_bias was given with a Softprompt: its bias is Softprompt.bias")
        softprompt, bias, positions, span = (
            softprompt.vectors,
            softprompt.bias,
            softprompt.positions,
            softprompt.span,
        )
    elif softprompt is None:
        if bias is not None:
            raise ValueError("softprompt_bias was given without a softprompt")
        return None
    else:
        positions = span = None
    width = embedding.shape[-1]
    if softprompt.dim() != 3 or softprompt.shape[-1] != width:
        raise ValueError(
            f"softprompt must have shape [batch, length, {width}] (the input embedding width), "
            f"got {tuple(softprompt.shape)}"
        )
    if softprompt.shape[0] not in (1, batch):
        raise ValueError(f"softprompt batch size {softprompt.shape[0]} does not match the input's {batch}")
    if softprompt.shape[1] == 0:
        return None
    if bias is not None:
        if bias.shape[-1] != softprompt.shape[1]:
            raise ValueError(
                f"softprompt_bias has {bias.shape[-1]} entries but the softprompt has {softprompt.shape[1]} vectors"
            )
        bias = bias.float().expand(batch, -1)
    if positions is not None:
        positions = positions.expand(batch, -1)
    return Softprompt(softprompt.to(embedding.dtype).expand(batch, -1, -1), bias, positions, span)


def key_bias(softprompt_bias, text_mask, num_tail: int, dtype) -> torch.Tensor:
    """Additive bias [B, L] on the keys of [softprompt ; text ; tail]: the softprompt's presence bias, text
    padding removed, the tail visible."""
    batch = text_mask.shape[0]
    absent = absent_bias(dtype)
    return torch.cat(
        [
            softprompt_bias.clamp(min=absent),
            torch.where(text_mask.bool(), 0.0, absent),
            text_mask.new_zeros(batch, num_tail, dtype=torch.float32),
        ],
        dim=1,
    ).to(dtype)


def attention_bias(
    softprompt_bias, text_mask, num_tail: int, dtype, window: int | None = None
) -> torch.Tensor:
    """4D additive mask [B, 1, L, L] for [softprompt ; text ; tail]: causal, and `key_bias` on the keys, for
    every query, a key's own included (so `presence_attention: folded`, which can only bias keys, computes
    the same). A query whose keys are all absent keeps a finite row (the absent bias is finite). `window`: a
    sliding window (Mistral's `sliding_window`): a query sees only the keys less than `window` columns back,
    as transformers' own mask would (a 4D mask is used as given)."""
    absent = absent_bias(dtype)
    keys = key_bias(softprompt_bias, text_mask, num_tail, dtype)
    length = keys.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    return torch.where(causal, keys[:, None, None, :], absent)
