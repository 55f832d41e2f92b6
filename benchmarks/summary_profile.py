"""What a trained AutoCompressor's summaries follow and cost: for compressed held-out segments, how many
vectors each kept against how hard its text was; and the KV-cache bytes and decode time of generating behind
the kept vectors (compacted: absent slots dropped).

For a variable-length model the question is whether learned lengths follow content: a segment the model
predicts badly without context (high no-context loss) carries more information, so it should keep more
vectors. A fixed-length model keeps the same number everywhere (no correlation to report), which makes it the
reference for the cost side.

A variable-length model reads hard lengths at inference. Soft presence (slot t weighted by its survival S_t through
an attention bias log S_t; how `training_presence: soft` trains) lets attention draw on a slot whose S_t is tiny, so
a model may lean on vectors that inference drops. The profile therefore scores the segments after the first
both ways: `nll_hard` (inference) against `nll_soft` (soft presence), and counts
the slots soft presence keeps with S_t >= SOFT_PRESENT. benchmarks/quality.py's eval stage runs this on the trained AutoCompressor and
stores it as `summary_profile` in results.json (and ablation.md's last columns).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from acomp.eval.protocol import _item, eval_mode, select_blocks

SOFT_PRESENT = 0.01  # a slot whose survival is at least this counts as kept by soft presence


@dataclass
class ProfileConfig:
    segment: int = 1024  # tokens per compressed segment (the eval protocol's S)
    segments: int = 3  # compressed segments per block (3 x 50 = the paper's 150 vectors)
    max_blocks: int = 64  # held-out blocks profiled, spread over the split
    batch: int = 8  # blocks per forward, and the decode batch
    prompt_tokens: int = 32  # decode: the prompt after the summaries (the block's final tokens' start)
    new_tokens: int = 128  # decode: greedy tokens generated, timed after one warm-up call


def kv_bytes_per_token(model) -> int:
    """Bytes one cached position costs: K and V of every layer in the model's dtype."""
    c = model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    element = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * kv_heads * head_dim * element


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), as Spearman's correlation needs."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r; None when either side is constant (a fixed-length model's lengths)."""
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(xs, ys)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    return pearson(ranks(xs), ranks(ys))


def commonest_length(lengths: list[float]) -> dict:
    """The length most segments kept (ties: the shortest) and their share: a learned length that is one count
    for nearly every segment acts as a fixed k the model chose, not an allocation by content."""
    length, count = min(Counter(lengths).items(), key=lambda item: (-item[1], item[0]))
    return {"commonest_length": length, "commonest_length_share": count / len(lengths)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spans(blocks, cfg: ProfileConfig, device: torch.device):
    """Batch by batch, each chosen block's last `segments x segment + prompt_tokens` tokens, split into the
    context to compress and the prompt after it."""
    span = cfg.segments * cfg.segment
    chosen = select_blocks(len(blocks), cfg.max_blocks)
    for start in range(0, len(chosen), cfg.batch):
        rows = [_item(blocks, i)[0][-(span + cfg.prompt_tokens) :] for i in chosen[start : start + cfg.batch]]
        ids = torch.stack(rows).to(device)
        if ids.shape[1] < span + cfg.prompt_tokens:
            raise ValueError(
                f"blocks of {ids.shape[1]} tokens are shorter than {cfg.segments} x {cfg.segment} + "
                f"{cfg.prompt_tokens} prompt tokens"
            )
        yield ids[:, :span], ids[:, span : span + cfg.prompt_tokens]


@torch.no_grad()
def profile(
    model, blocks, cfg: ProfileConfig, device: torch.device | str | None = None, time_decode: bool = True
) -> dict:
    """Profile `model` on `blocks` (CorpusBlocks or a sequence of token tensors / {"input_ids": ...} dicts),
    each at least `segments x segment + prompt_tokens` tokens long: the last such span of each block is read
    as `segments` compressed segments followed by the prompt (so with the eval protocol's sizes, the segments
    just before its scored segment). `time_decode=False` (the device is shared with other work, so a time
    would mean nothing) leaves `decode_ms_per_token` None: `decode_ms_per_token()` measures it later."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    lengths: list[float] = []
    losses: list[float] = []
    decode = {}
    presence = PresenceTotals() if getattr(model, "variable_length", False) else None
    with eval_mode(model):
        for context, prompt in _spans(blocks, cfg, device):
            if presence is not None:
                presence.add(model, context, cfg)
            memory = model.compress_context(context, segment_lengths=[cfg.segment] * cfg.segments)
            if memory.summary_lengths is not None:
                kept = memory.summary_lengths.float()  # [B, segments]
            else:
                kept = torch.full((context.shape[0], cfg.segments), memory.softprompt.shape[1] / cfg.segments)
            for j in range(cfg.segments):
                text = context[:, j * cfg.segment : (j + 1) * cfg.segment]
                out = model(text, labels=text, return_logits=False)
                nll = out.segment_nll.sum(dim=1) / out.segment_tokens.sum(dim=1)  # no-context loss per block
                losses += nll.double().tolist()
                lengths += kept[:, j].double().tolist()
            if not decode:
                decode = _decode(model, prompt, memory.summary.compact(), cfg, device, time_decode)
    return {
        **asdict(cfg),
        "blocks": len(lengths) // cfg.segments,
        "mean_vectors_per_segment": sum(lengths) / len(lengths),
        "length_loss_pearson": pearson(lengths, losses),
        "length_loss_spearman": spearman(lengths, losses),
        **commonest_length(lengths),
        **decode,
        **(PresenceTotals.empty() if presence is None else presence.result()),
        "pairs": [[length, loss] for length, loss in zip(lengths, losses)],  # (vectors kept, no-context loss)
    }


class PresenceTotals:
    """Held-out loss of the segments after the first behind hard (inference) and soft presence, and
    the slots per compressing segment that soft presence keeps (S_t >= SOFT_PRESENT)."""

    def __init__(self):
        self.nll = {True: 0.0, False: 0.0}
        self.tokens = 0
        self.soft_slots = 0.0
        self.segments = 0

    def add(self, model, context: torch.Tensor, cfg: ProfileConfig) -> None:
        trained_with = model.config.training_presence
        # Soft presence measures the faint slots' worth, also for a model trained with sampled lengths.
        model.config.training_presence = "soft"
        try:
            for hard in (True, False):
                out = model(
                    context,
                    labels=context,
                    segment_lengths=[cfg.segment] * cfg.segments,
                    hard_stop=hard,
                    output_softprompt=True,
                    return_logits=False,
                )
                self.nll[hard] += out.segment_nll[:, 1:].double().sum().item()
        finally:
            model.config.training_presence = trained_with
        self.tokens += int(out.segment_tokens[:, 1:].sum())
        self.soft_slots += (out.softprompt_bias.float().exp() >= SOFT_PRESENT).sum().item()
        self.segments += out.softprompt_bias.shape[0] * cfg.segments

    def result(self) -> dict:
        return {
            "nll_hard": self.nll[True] / self.tokens,
            "nll_soft": self.nll[False] / self.tokens,
            "soft_slots_per_segment": self.soft_slots / self.segments,
        }

    @staticmethod
    def empty() -> dict:
        return {"nll_hard": None, "nll_soft": None, "soft_slots_per_segment": None}


@torch.no_grad()
def decode_ms_per_token(model, blocks, cfg: ProfileConfig, device: torch.device | str | None = None) -> float:
    """`profile`'s decode time alone (its first batch), for a model profiled while the device was shared."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model):
        context, prompt = next(_spans(blocks, cfg, device))
        memory = model.compress_context(context, segment_lengths=[cfg.segment] * cfg.segments)
        return _decode(model, prompt, memory.summary.compact(), cfg, device, True)["decode_ms_per_token"]


def _decode(
    model, prompt: torch.Tensor, summary, cfg: ProfileConfig, device: torch.device, timed: bool
) -> dict:
    """Greedy decode behind the compacted summaries: its time per token (after a warm-up call; None when not
    `timed`) and the KV cache it holds at the end (the summaries' slots, padded to the batch's longest, +
    prompt + new tokens)."""
    ms = None
    if timed:
        # Exactly new_tokens (no end-of-sequence stop): equal work per model.
        gen = {"max_new_tokens": cfg.new_tokens, "eos_token_id": []}
        model.generate(prompt, softprompt=summary, **gen)
        _sync(device)
        t = time.perf_counter()
        model.generate(prompt, softprompt=summary, **gen)
        _sync(device)
        ms = 1000 * (time.perf_counter() - t) / cfg.new_tokens
    cached = summary.length + cfg.prompt_tokens + cfg.new_tokens
    return {
        "decode_batch": prompt.shape[0],
        "decode_ms_per_token": ms,
        "cache_summary_slots": summary.length,
        "kv_bytes_per_sample": kv_bytes_per_token(model) * cached,
    }


if __name__ == "__main__":
    raise SystemExit(
        "benchmarks/summary_profile.py is a module of benchmarks/quality.py and inference.py, not a script: run those"
    )
