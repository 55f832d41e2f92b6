"""Evaluate an AutoCompressor with the paper's protocol: perplexity of each block's final segment with no
context, behind the summary vectors of 1, 2, ... compressed segments, and with full attention over as much
plain context as the model's window allows. Per domain and overall, with token counts.

    python launchers/eval.py --model runs/tiny/final --data data/stdlib --eval-segment 128 --segment-length 128 --max-blocks 128 --out runs/tiny/eval
    torchrun --nproc_per_node 8 launchers/eval.py --model princeton-nlp/AutoCompressor-Llama-2-7b-6k --data data/rp-6k --out eval/ac-llama

Writes OUT/results.json, OUT/results.md and OUT/ppl_vs_context.png (docs/EVALUATION.md). Ranks split the
blocks; per-block results are gathered and summed exactly, so any number of ranks gives the same numbers.
Exit status: 0 done, 2 bad arguments or input (a missing model or corpus, a split the corpus lacks: one
`error:` line naming it, before the model is loaded where possible), 1 anything else.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DTYPES = ("auto", "float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="AutoCompressor (or base model) directory or hub name")
    p.add_argument(
        "--data", required=True, help="corpus directory (or URI) built by preprocess/build_corpus.py"
    )
    p.add_argument("--split", default="val", help="corpus split to evaluate (default: val)")
    p.add_argument(
        "--out", required=True, help="output directory for results.json, results.md, ppl_vs_context.png"
    )
    p.add_argument(
        "--eval-segment",
        type=int,
        default=2048,
        help="tokens of the final, scored segment; its last N-1 tokens are the targets (default: 2048)",
    )
    p.add_argument(
        "--segment-length",
        type=int,
        default=None,
        help="tokens per compressed context segment (default: --eval-segment)",
    )
    p.add_argument(
        "--max-context-segments",
        type=int,
        default=None,
        help="summary conditions for 1..N compressed segments (default: as many as a block holds)",
    )
    p.add_argument(
        "--fa-window",
        type=int,
        default=None,
        help="tokens full attention may see, context + eval segment (default: the model config's "
        "max_position_embeddings; 0 = no full-attention baseline)",
    )
    p.add_argument(
        "--max-blocks",
        type=int,
        default=None,
        help="blocks to score, spread evenly over the split (default: all)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="blocks per forward on each rank (default: 1)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weights dtype: auto = bfloat16 on GPU, float32 on CPU (losses are always fp32)",
    )
    p.add_argument(
        "--variable",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also evaluate the variable-length conditions (stopping where the model says); default: when "
        "the model's compression_mode is variable. --variable on a fixed-mode model is an error",
    )
    p.add_argument(
        "--stop-threshold",
        type=float,
        default=None,
        help="variable mode: stop probability threshold for compression (default: the model config's "
        "compress_stop_threshold; null there = 0.5 under the cumulative rule, <eoc> as the argmax under step)",
    )
    p.add_argument(
        "--stop-rule",
        choices=("cumulative", "step"),
        default=None,
        help="variable mode: what the stop threshold reads: cumulative = the probability that compression has "
        "stopped by that slot (no threshold: 0.5, the median length), step = each slot's own stop probability; "
        "default: the model config's compress_stop_rule (cumulative unless it records another)",
    )
    p.add_argument(
        "--stop-thresholds",
        type=float,
        nargs="+",
        default=(),
        metavar="T",
        help="variable mode: the variable-length conditions again at each of these stop thresholds "
        "(conditions summary_variable_k_tT): one model's perplexity at several mean lengths",
    )
    p.add_argument(
        "--attn-implementation",
        default="sdpa",
        choices=("sdpa", "eager", "flash_attention_2"),
        help="attention kernel passed to transformers (default: sdpa)",
    )
    p.add_argument(
        "--records",
        action="store_true",
        help="also store every block's per-condition NLL, target tokens and summary vectors kept in results.json",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from acomp.data.remote import RemoteError
    from acomp.eval import CorpusBlocks, ProtocolConfig, evaluate, report

    cfg = ProtocolConfig(
        eval_segment=args.eval_segment,
        segment_length=args.eval_segment if args.segment_length is None else args.segment_length,
        max_context_segments=args.max_context_segments,
        fa_window=args.fa_window,
        variable=args.variable,
        stop_threshold=args.stop_threshold,
        stop_rule=args.stop_rule,
        stop_thresholds=tuple(args.stop_thresholds),
        batch_size=args.batch_size,
        max_blocks=args.max_blocks,
    )
    try:
        cfg.check()
        check_inputs(args.model, args.data, args.split, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, device = init_process_group()
    try:
        model, warnings = load_model(args.model, args.dtype, args.attn_implementation, device)
        blocks = CorpusBlocks(args.data, args.split, vocab_size=model.get_input_embeddings().weight.shape[0])
        result = evaluate(
            model, blocks, cfg, device=device, progress=not args.no_progress, keep_records=args.records
        )
        result.plan.warnings[:0] = warnings  # into results.json and results.md with the planner's
    except (ValueError, FileNotFoundError, RemoteError) as e:  # RemoteError: no corpus at a remote --data
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        out = Path(args.out)
        meta = {
            "model": args.model,
            "data": args.data,
            "split": args.split,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        }
        report.write_json(result, out / "results.json", meta)
        table = report.markdown(result, title=f"{args.model} on {args.data} ({args.split})")
        (out / "results.md").write_text(table)
        model_path = Path(args.model.rstrip("/"))  # runs/tiny/final -> "tiny/final"
        report.plot(
            result,
            out / "ppl_vs_context.png",
            title=f"{model_path.parent.name}/{model_path.name}".lstrip("/"),
        )
        print(table)
        print(
            f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'ppl_vs_context.png'} "
            f"({result.blocks} blocks in {result.seconds:.1f} s)"
        )
    return 0


def init_process_group():
    """(rank, device): joins torchrun's group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return (dist.get_rank() if dist.is_initialized() else 0), device


def check_inputs(model: str, data: str, split: str, out: str) -> None:
    """Before anything is loaded: --out can be created and written, a local --model exists, a local --data is a
    corpus with that split (ValueError naming the argument; remote corpora and hub models are checked when
    they are read)."""
    from acomp.data import read_manifest
    from acomp.data.dataset import is_remote
    from acomp.train.preflight import missing_model_dir

    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: not writable")
    if missing_model_dir(model):
        raise ValueError(f"--model {model}: no such model directory")
    if is_remote(data):
        return
    if not Path(data).is_dir():
        raise ValueError(
            f"--data {data}: no such corpus directory (build one with preprocess/build_corpus.py)"
        )
    try:
        splits = read_manifest(data)["splits"]
    except OSError as e:
        raise ValueError(f"--data {data}: {e}") from None
    if split not in splits:
        raise ValueError(f"--split {split}: the corpus at {data} has the splits {', '.join(sorted(splits))}")


def load_model(name: str, dtype: str, attn: str, device):
    """(the model on `device` in eval mode, warnings about it that belong in the report)"""
    import torch

    from acomp import AutoCompressorModel

    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    from acomp.train.preflight import short_reason

    try:
        model, info = AutoCompressorModel.from_pretrained(
            name, dtype=getattr(torch, dtype), attn_implementation=attn, output_loading_info=True
        )
    except (OSError, ValueError) as e:  # transformers: not a model directory, not on the hub, unreadable
        raise ValueError(f"--model {name}: cannot load it ({short_reason(e)})") from None
    warnings = []
    if model.config.summary_length and "embed_summary.weight" in info["missing_keys"]:
        warnings.append(
            f"{name} has no trained summary table (embed_summary.weight): its summary conditions use "
            "untrained summary tokens (a base model: read only no_context and full_attention)"
        )
        print(f"warning: {warnings[-1]}", file=sys.stderr)
    return model.to(device).eval(), warnings


if __name__ == "__main__":
    sys.exit(main())
