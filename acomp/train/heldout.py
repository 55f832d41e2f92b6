"""Held-out perplexity of a block's last segment with no context vs behind the summary vectors of the
segments before it: the trainer's periodic evaluation and the demo's.

Two conditions of the paper's protocol (acomp.eval.protocol scores them):
"summary" compresses the earlier segments into summary vectors and scores the last one behind them;
"no context" scores the last segment alone. Both score exactly the same targets (tokens 2..n of the last
segment: its first token would be predicted from plain text in one case and from nothing in the other).
The full protocol (every context length, full attention, per domain, reports) is acomp.eval / launchers/eval.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from acomp.eval.protocol import (
    NO_CONTEXT,
    SUMMARY,
    SUMMARY_VARIABLE,
    Condition,
    _item,
    _rank_world,
    eval_mode,
    is_variable,
    score,
    select_blocks,
)
from acomp.train.distributed import all_reduce_sum


@torch.no_grad()
def heldout_ppl(
    model: torch.nn.Module,
    data: Sequence,
    segment_lengths: list[int],
    max_blocks: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """{"no_context_ppl", "summary_ppl", "blocks", "tokens"} over `max_blocks` blocks of `data` spread
    evenly over it, as the eval protocol picks them (the first blocks of an ordered split may all come from
    one document).

    `data[i]` is block i: a token-id tensor [L] or [B, L], or a dict with "input_ids" (CorpusBlocks). Under
    torch.distributed each rank scores every world_size-th chosen block and the sums are reduced; every rank
    runs the same number of forwards (ZeRO-3 gathers parameters collectively).
    """
    rank, world = _rank_world()
    segment_lengths = [int(n) for n in segment_lengths]
    if len(segment_lengths) < 2:
        raise ValueError(f"segment_lengths needs a context and a target segment, got {segment_lengths}")
    total, target = sum(segment_lengths), segment_lengths[-1]
    if target < 2:
        raise ValueError(f"the target segment needs at least 2 tokens, got segment_lengths {segment_lengths}")
    no_context = Condition(NO_CONTEXT)
    # A variable-length model stops where it decides (its configured threshold), as at inference.
    kind = SUMMARY_VARIABLE if is_variable(model) else SUMMARY
    summary = Condition(kind, total - target, tuple(segment_lengths[:-1]))
    if device is None:
        device = next(model.parameters()).device
    sums = [0.0, 0.0, 0.0, 0.0]  # nll no-context, nll summary, target tokens, blocks
    chosen = select_blocks(len(data), max_blocks)
    rounds = -(-len(chosen) // world)
    with eval_mode(model):
        for i in range(rank, rounds * world, world):
            # The last round's spare ranks score a chosen block again and drop it: equal forwards everywhere.
            counted = i < len(chosen)
            ids, _ = _item(data, chosen[i % len(chosen)])
            ids = (ids.unsqueeze(0) if ids.dim() == 1 else ids).to(device)
            if ids.shape[1] < total:
                raise ValueError(
                    f"a block has {ids.shape[1]} tokens, fewer than segment_lengths {segment_lengths} need"
                )
            ids = ids[:, ids.shape[1] - total :]
            with_summary = score(model, ids, summary, target)
            alone = score(model, ids, no_context, target)
            if counted:
                sums[0] += math.fsum(alone.nll)
                sums[1] += math.fsum(with_summary.nll)
                sums[2] += sum(with_summary.tokens)
                sums[3] += ids.shape[0]
    nll_alone, nll_summary, tokens, blocks = all_reduce_sum(sums, torch.device(device))
    if tokens == 0:
        raise ValueError("no blocks to evaluate")
    return {
        "no_context_ppl": math.exp(nll_alone / tokens),
        "summary_ppl": math.exp(nll_summary / tokens),
        "blocks": int(blocks),
        "tokens": int(tokens),
    }


def heldout_ppl_of_export(
    model_dir, data_path, segment_lengths: list[int], max_blocks: int = 64, split: str = "val"
) -> dict:
    """heldout_ppl for an exported model (e.g. <output_dir>/final) on a corpus split."""
    from acomp import AutoCompressorModel
    from acomp.eval import CorpusBlocks

    model = AutoCompressorModel.from_pretrained(str(model_dir)).eval()
    blocks = CorpusBlocks(str(data_path), split, vocab_size=model.get_input_embeddings().weight.shape[0])
    return heldout_ppl(model, blocks, segment_lengths, max_blocks=max_blocks)
