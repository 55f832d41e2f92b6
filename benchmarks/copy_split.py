"""Where full attention's gain over no context comes from, and how much of it the summaries recover.

The targets of the protocol's scored segment are split in two: *copies*, whose last `ngram` tokens (the target
and the ones before it) occur inside full attention's context and not earlier in the segment itself (so only
a model that reads the context can copy them), and the *rest*. For each part: the loss with no context,
behind the summaries of `segments` compressed segments and with full attention, and the share of the
no-context -> full-attention gap the summaries close there. On a corpus that repeats itself (source code
repeats names and lines), full attention gains most on copies, which a few vectors per 1,024 tokens cannot
hold; the rest shows what the summaries do with the content they can carry.

benchmarks/quality.py's eval stage runs this on the trained AutoCompressor and stores it as `copy_split` in
results.json (and a line of results.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from acomp.eval.protocol import (
    FULL_ATTENTION,
    NO_CONTEXT,
    SUMMARY,
    SUMMARY_VARIABLE,
    Condition,
    _item,
    condition_output,
    eval_mode,
    is_variable,
    select_blocks,
)

PARTS = ("copy", "rest")


@dataclass
class CopySplitConfig:
    segment: int = 1024  # tokens per compressed segment (the eval protocol's S)
    segments: int = 3  # compressed segments behind the scored one (3 x 50 = the paper's 150 vectors)
    eval_segment: int = 1024  # the scored segment (E tokens, E - 1 targets)
    fa_context: int = 1024  # full attention's context tokens (quality.py: the window minus E)
    # tokens (>= 2) ending at a target that must occur in the context for it to count as a copy
    ngram: int = 4
    max_blocks: int = 64  # held-out blocks, spread over the split
    batch: int = 8


def copy_targets(context: list[int], segment: list[int], ngram: int) -> list[bool]:
    """For each target of `segment` (its tokens 1 .. E-1): whether the `ngram` tokens ending at it, read in
    `context + segment`, occur entirely inside `context` and do not end earlier inside `segment`."""
    seq = context + segment
    start = len(context)
    in_context = {tuple(context[i : i + ngram]) for i in range(len(context) - ngram + 1)}
    seen_in_segment: set[tuple[int, ...]] = set()
    labels = []
    for p in range(start, len(seq)):
        gram = tuple(seq[max(p - ngram + 1, 0) : p + 1])
        if p > start:
            labels.append(len(gram) == ngram and gram in in_context and gram not in seen_in_segment)
        if p - ngram + 1 >= start:
            seen_in_segment.add(gram)
    return labels


def _token_nll(model, ids: torch.Tensor, cond: Condition, E: int) -> torch.Tensor:
    """Per-target NLL [B, E-1] of the scored segment under `cond` (the protocol's reading of the condition)."""
    out, _ = condition_output(model, ids, cond, E, return_logits=True)
    logits = out.logits[:, -E:-1].float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, -E + 1 :], reduction="none")


@torch.no_grad()
def copy_split(model, blocks, cfg: CopySplitConfig, device: torch.device | str | None = None) -> dict:
    """The split on `blocks` (CorpusBlocks or a sequence of token tensors / {"input_ids": ...} dicts): per part,
    its targets, each condition's mean loss, and the share of the gap the summaries close there. A
    variable-length model keeps the vectors its own stopping rule keeps (the protocol's summary_variable rows)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    E, S, k = cfg.eval_segment, cfg.segment, cfg.segments
    summary = SUMMARY_VARIABLE if is_variable(model) else SUMMARY
    conditions = {
        NO_CONTEXT: Condition(NO_CONTEXT),
        SUMMARY: Condition(summary, k * S, (S,) * k),
        FULL_ATTENTION: Condition(FULL_ATTENTION, cfg.fa_context),
    }
    span = max(k * S, cfg.fa_context) + E
    nll = {(part, name): 0.0 for part in PARTS for name in conditions}
    tokens = dict.fromkeys(PARTS, 0)
    chosen = select_blocks(len(blocks), cfg.max_blocks)
    with eval_mode(model):
        for first in range(0, len(chosen), cfg.batch):
            rows = [_item(blocks, i)[0][-span:] for i in chosen[first : first + cfg.batch]]
            if any(len(r) < span for r in rows):
                raise ValueError(f"blocks of {min(len(r) for r in rows)} tokens are shorter than {span}")
            ids = torch.stack(rows).to(device)
            copy = torch.tensor(
                [
                    copy_targets(r[-E - cfg.fa_context : -E].tolist(), r[-E:].tolist(), cfg.ngram)
                    for r in rows
                ],
                device=device,
            )
            for name, cond in conditions.items():
                losses = _token_nll(model, ids, cond, E).double()
                for part, mask in zip(PARTS, (copy, ~copy)):
                    nll[part, name] += losses[mask].sum().item()
            tokens["copy"] += int(copy.sum())
            tokens["rest"] += int((~copy).sum())
    parts = {}
    for part in PARTS:
        loss = {name: nll[part, name] / tokens[part] if tokens[part] else math.nan for name in conditions}
        gap = loss[NO_CONTEXT] - loss[FULL_ATTENTION]
        parts[part] = {
            "targets": tokens[part],
            **{f"loss_{name}": value for name, value in loss.items()},
            "gap_closed": (loss[NO_CONTEXT] - loss[SUMMARY]) / gap if gap else math.nan,
        }
    fa_gain = {part: nll[part, NO_CONTEXT] - nll[part, FULL_ATTENTION] for part in PARTS}
    total = sum(tokens.values())
    return {
        **asdict(cfg),
        "blocks": total // (E - 1),
        "copy_share_of_targets": tokens["copy"] / total,
        "copy_share_of_fa_gain": fa_gain["copy"] / sum(fa_gain.values())
        if sum(fa_gain.values())
        else math.nan,
        **parts,
    }


if __name__ == "__main__":
    raise SystemExit("benchmarks/copy_split.py is a module of benchmarks/quality.py, not a script: run that")
