"""Generation conditioned on summary vectors, with a KV cache.

The softprompt and the prompt are encoded once (prefill); then each new token is decoded
incrementally against the cache. Positions follow the model's position rule, so the cached run
matches a full forward over [softprompt ; prompt ; generated] token for token.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .attention import sdpa_context
from .compressor import attention_bias
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
) -> torch.LongTensor:
    """Returns [B, prompt_len + new] token ids. Greedy unless do_sample. Prompts may be padded on either
    side (positions come from the attention mask). After a sample emits EOS it is filled with pad_token_id.
    `softprompt_bias` (variable-length mode) marks absent softprompt vectors. The control tokens
    `<sum>` / `<eoc>` are never generated."""
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
    eos = torch.tensor(
        []
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
        device=device,
    )
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos.tolist() or [0])[0]

    embed = model.get_input_embeddings()
    decoder = model.get_decoder()
    width = embed.embedding_dim
    softprompt = model._check_softprompt(softprompt, batch, width, embed.weight)
    softprompt_bias = model._check_softprompt_bias(softprompt_bias, softprompt, batch)
    soft_len = 0 if softprompt is None else softprompt.shape[1]
    rule = model.position_rule
    control = [getattr(config, k, None) for k in ("sum_token_id", "eoc_token_id")]
    suppress_token_ids = list(suppress_token_ids or []) + [t for t in control if t is not None]

    # Prefill: [softprompt ; prompt] in one pass.
    prompt_embeds = embed(input_ids)
    embeds = prompt_embeds if softprompt is None else torch.cat([softprompt, prompt_embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(batch, soft_len), attention_mask], dim=1)
    prefill_mask = mask
    if softprompt_bias is not None:  # absent vectors are masked through an additive bias on their keys
        prefill_mask = attention_bias(softprompt_bias, attention_mask, 0, embeds.dtype)
        key_bias = prefill_mask[:, :, -1:, :].clone()
        key_bias[..., -1] = torch.where(attention_mask[:, -1:].bool(), 0.0, absent_bias(embeds.dtype))[
            :, None
        ]
    positions = rule.segment(soft_len, attention_mask, 0)
    cache = DynamicCache()
    with sdpa_context(config.sdpa_backend, device):
        hidden = decoder(
            inputs_embeds=embeds,
            attention_mask=prefill_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    # The next token is predicted at the last real prompt token (which is the last column under left padding).
    last_real = soft_len + _last_true_index(attention_mask)
    if prompt_len == 0:
        last_real = torch.full((batch,), soft_len - 1, device=device)
    next_logits = model.lm_head(hidden[torch.arange(batch, device=device), last_real.clamp(min=0)])
    next_position = rule.first_new_position(soft_len, attention_mask)

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = _pick(
            next_logits.float(), do_sample, temperature, top_k, top_p, suppress_token_ids, generator
        )
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        new_tokens.append(token)
        if step == max_new_tokens - 1:
            break
        if eos.numel():
            finished |= torch.isin(token, eos)
            # A host sync: without EOS ids none is needed, so the CPU queues steps ahead of the GPU.
            if finished.all():
                break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        step_mask = mask
        if softprompt_bias is not None:
            key_bias = torch.cat([key_bias, key_bias.new_zeros(batch, 1, 1, 1)], dim=-1)
            step_mask = key_bias
        with sdpa_context(config.sdpa_backend, device):
            hidden = decoder(
                inputs_embeds=embed(token[:, None]),
                attention_mask=step_mask,
                position_ids=next_position[:, None],
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        next_logits = model.lm_head(hidden[:, -1])
        next_position = next_position + 1
    if not new_tokens:
        return input_ids
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a 0/1 mask [B, n] (0 for an all-zero row)."""
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.zeros_like(idx)).max(dim=1).values


def _pick(logits, do_sample, temperature, top_k, top_p, suppress, generator) -> torch.Tensor:
    if suppress:
        logits[:, suppress] = float("-inf")
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
