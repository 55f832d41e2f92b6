"""Variable-length compression: how many summary vectors a segment spends, and what that costs.

Layout of a compressing segment in variable mode:

    [softprompt ; segment tokens ; <sum> ; slot_1 ... slot_T]        T = compression_max_len

`<sum>` is a vocabulary token that marks the end of the text and triggers compression. Slot t's input
is the learned embedding `embed_summary[t]` (the paper's summary tokens), its output z_t is summary
vector t, and its stop probability p_t = softmax(lm_head(z_t))[<eoc>] is read from the LM head.

Why learned slot inputs rather than feeding z_{t-1} back step by step: under causal attention z_t
depends only on slots <= t, so running all T slots in one parallel pass gives exactly the vectors a
loop that stopped at L would have produced (the prefix property). Training therefore costs one pass
per segment (not T sequential decoder calls), per-segment checkpointing still applies, and a model
trained with fixed summaries starts from the same summary-token table.

One meaning of "stop at step t", shared by training and inference: vector t is emitted, *then* the
loop stops with probability p_t. So vector t is present with probability
S_t = prod_{i<t} (1 - p_i) (S_1 = 1: a compressing segment always keeps at least one vector), and the
expected length is E[L] = sum_t S_t. Inference keeps vectors 1..L, L the first t whose stop decision fires,
else T. `compress_stop_rule` cumulative (the default): the probability that the loop has stopped by t,
1 - S_(t+1), exceeds `compress_stop_threshold` (no threshold: 0.5, so L is the median length); step: p_t
exceeds it (or, with no threshold, <eoc> is slot t's argmax token). The argmax reads a distribution that gets
no next-token loss at a summary slot, so <eoc> can win it at a small p_t; where stop probabilities are spread
over slots rather than sharp, only the cumulative rule keeps about the E[L] that training priced.

How the next segment sees uncertain vectors in training (`training_presence`): sampled (the default)
draws a length per segment from the stop distribution (slot t present with probability S_t), keeps the
slots up to it and removes the rest, and passes the gradient of log S_t straight through that hard bias,
so training sees what inference sees: a kept slot or none. soft: an additive attention bias log S_t on
the key of memory slot t, in every layer (hard masking when S is 0 or 1, and unlike scaling the vector
not undone by the first pre-norm layer); attention can still read a slot whose S_t is small (its score
can outweigh the bias), a slot inference drops, so the penalty undercharges faint slots.

Length penalty (added to the LM loss, averaged over samples and compressing segments):
    compression_lambda * E[L] / (compression_alpha * n_tokens_in_segment)
"""

from __future__ import annotations

import torch

PRESENT = 0.0


def absent_bias(dtype: torch.dtype) -> float:
    """The additive bias that removes a key (finite, so a row never becomes all -inf)."""
    return torch.finfo(dtype).min


def stop_probabilities(logits: torch.Tensor, eoc_token_id: int) -> torch.Tensor:
    """p_t = softmax(logits)[<eoc>] in fp32. logits: [B, T, V] -> [B, T]."""
    return logits.float().log_softmax(dim=-1)[..., eoc_token_id].exp()


def soft_presence(stop_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training path. Returns (log S_t [B, T], E[L] [B]) from stop probabilities [B, T]."""
    absent = absent_bias(stop_prob.dtype)
    # p == 1 exactly means "certainly stopped": use the hard bias (and keep gradients finite).
    log_keep = torch.where(stop_prob >= 1.0, absent, torch.log1p(-stop_prob.clamp(max=1.0 - 1e-6)))
    exclusive = torch.cumsum(log_keep, dim=1)[:, :-1].clamp(min=absent)  # sum over i < t
    log_survival = torch.cat([torch.zeros_like(log_keep[:, :1]), exclusive], dim=1)
    return log_survival, log_survival.exp().sum(dim=1)


def sampled_presence(stop_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training path with sampled lengths. Returns (bias [B, T], E[L] [B]): per sample a length L drawn from
    the stop distribution (P(L >= t) = S_t, through one uniform u: slot t is present when S_t >= u), the bias 0
    on slots 1..L and absent beyond in the forward pass, and the gradient of log S_t in the backward pass
    (straight through), so a present slot's usefulness still reaches the stop probabilities before it. Unlike
    soft presence, no slot is ever faintly visible: a slot training relies on is one inference keeps as often
    as its survival says."""
    log_survival, expected = soft_presence(stop_prob)
    u = 1.0 - torch.rand(stop_prob.shape[0], 1, device=stop_prob.device, dtype=log_survival.dtype)  # (0, 1]
    hard = torch.where(log_survival >= u.log(), PRESENT, absent_bias(log_survival.dtype))
    return log_survival + (hard - log_survival).detach(), expected


def hard_lengths(
    stop_prob: torch.Tensor,
    logits: torch.Tensor | None,
    eoc_token_id: int,
    threshold: float | None,
    rule: str,
) -> torch.Tensor:
    """Inference path: L [B] = first t (1-based) whose stop decision fires, else T."""
    max_len = stop_prob.shape[1]
    if rule == "cumulative":  # stopped by t with probability 1 - S_(t+1) > threshold: S_t >= 1 - threshold
        survival = soft_presence(stop_prob.float())[0].exp()
        return (survival >= 1.0 - (0.5 if threshold is None else threshold)).sum(dim=1)
    if threshold is None:
        fires = logits.argmax(dim=-1) == eoc_token_id
    else:
        fires = stop_prob > threshold
    steps = torch.arange(1, max_len + 1, device=stop_prob.device).expand_as(fires)
    return torch.where(fires, steps, torch.full_like(steps, max_len)).min(dim=1).values


def hard_presence_bias(lengths: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] bias: 0 for slots 1..L, absent beyond."""
    slots = torch.arange(1, max_len + 1, device=lengths.device).expand(lengths.shape[0], -1)
    return torch.where(slots <= lengths[:, None], PRESENT, absent_bias(dtype)).to(dtype)


def length_penalty(
    expected_len: torch.Tensor, n_tokens: torch.Tensor, lam: float, alpha: float
) -> torch.Tensor:
    """lambda * E[L] / (alpha * n) per sample [B]."""
    return lam * expected_len / (alpha * n_tokens.clamp(min=1).to(expected_len.dtype))
