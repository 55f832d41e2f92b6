"""The main job on the embedded default: train a tiny AutoCompressor on the stdlib corpus, then evaluate it.

1. builds `data/stdlib` (the Python stdlib's source, split by file into train/val, a locally trained BPE,
   512-token blocks as MDS shards) unless it is already there;
2. trains `configs/tiny.yaml` (a 2-layer Llama-family AutoCompressor, 16 summary vectors per 128-token
   segment, DeepSpeed ZeRO-1 on CPU) to `runs/tiny/final`, resuming if a checkpoint exists;
3. scores the last 128-token segment of held-out blocks with no context and behind the summary vectors of
   the three segments before it, and prints both perplexities.

    python launchers/demo.py [key=value ...]     # e.g. train.max_steps=100 for a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "tiny.yaml"),
        help="run config YAML (default: configs/tiny.yaml)",
    )
    parser.add_argument(
        "--eval-blocks",
        type=int,
        default=128,
        help="held-out blocks to score, spread evenly over the split (default 128)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    if args.eval_blocks < 1:
        print(f"error: --eval-blocks must be a positive integer, got {args.eval_blocks}", file=sys.stderr)
        return 2

    from launchers.train import config_or_none, train

    os.chdir(REPO)  # the config's relative paths (data/stdlib, runs/tiny) are relative to the repository
    cfg = config_or_none(args.config, args.overrides)
    if cfg is None:
        return 2
    status, finished = train(cfg)  # the trainer's exit statuses and one-line errors (launchers/train.py)
    if not finished:
        return status
    from acomp.train import heldout_ppl_of_export

    out = Path(cfg.train.output_dir)
    if not (out / "final").is_dir():
        print(f"error: no model at {out / 'final'} to evaluate (train.export_final=false?)", file=sys.stderr)
        return 2
    from transformers import AutoConfig

    from acomp.train.data import open_corpus
    from acomp.train.loop import eval_segment_lengths
    from acomp.train.preflight import position_budget

    # The segments the trainer's held-out loss uses, on the corpus' own blocks (a --config may read a corpus
    # built beforehand)
    block_size = open_corpus(cfg.data.path, cfg.data.cache_dir).block_size
    max_segment = position_budget(cfg, AutoConfig.from_pretrained(out / "final"))
    lengths = eval_segment_lengths(cfg, block_size, max_segment)
    result = heldout_ppl_of_export(out / "final", cfg.data.path, lengths, max_blocks=args.eval_blocks)
    (out / "demo_eval.json").write_text(json.dumps(result, indent=2))
    print(
        f"held-out last-segment perplexity over {result['blocks']} blocks ({result['tokens']} tokens): "
        f"no context {result['no_context_ppl']:.2f}, "
        f"with {len(lengths) - 1} segments of summary vectors {result['summary_ppl']:.2f}"
    )
    print(f"model: {out / 'final'}  results: {out / 'demo_eval.json'}")
    return 0


if __name__ == "__main__":
    from launchers.train import interrupted

    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(interrupted())
