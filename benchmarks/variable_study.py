"""Fixed vs variable-length compression: held-out perplexity against summary vectors spent per segment.

Same base, same tokens: one base LM is pretrained on the embedded stdlib corpus (no compression,
whole 512-token blocks), then every arm is fine-tuned from it for the same steps on the same batches
(same seed, same data order) as an AutoCompressor with 4 x 128-token segments:

- fixed arms: summary_length in {1, 2, 4, 16};
- variable arms: compression_max_len 16, compression_lambda over a sweep (0 = no penalty).

Each arm is then scored with the paper's protocol (acomp.eval, as launchers/eval.py) on held-out blocks
spread over the split: perplexity of the last 128-token segment behind the summary vectors of the three
segments before it (variable arms stop at inference at the first slot by which compression has stopped with
a probability above --threshold, or with `--stop-rule step` at the first whose own stop probability is above
it), the mean number of summary vectors a compressing segment kept, and (variable arms) the rank correlation
of each segment's kept vectors with its text's no-context loss: whether lengths follow content.
Also: the no-context perplexity of the base (same targets). Writes results.json, a markdown table and a
PNG plot (perplexity vs mean summary vectors per segment, one line per mode) to --out.

    python benchmarks/variable_study.py --preset cpu               # the embedded corpus on this CPU
    python benchmarks/variable_study.py --smoke                    # seconds: plumbing only

On a GPU, the frontier runs on the quality benchmark's base, corpus and protocol instead (1,024-token
segments): variable-length arms of `benchmarks/quality.py --arm` (its docstring shows one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from acomp.cli import non_negative_float, positive_int  # noqa: E402
from acomp.modeling.config import STOP_RULES, TRAINING_PRESENCE, CompressionFields  # noqa: E402

PRESETS = {
    # name: model arch, steps, batch, eval blocks
    "smoke": {"arch": (64, 2, 4), "base_steps": 4, "steps": 4, "batch": 4, "eval_blocks": 4},
    "cpu": {"arch": (128, 2, 4), "base_steps": 300, "steps": 300, "batch": 8, "eval_blocks": 256},
}
FIXED = [1, 2, 4, 16]
LAMBDAS = [0.0, 0.03, 0.1, 0.3]  # none, and weights that settle at different lengths (RESULTS.md)
SEGMENT, N_SEGMENTS, MAX_LEN = 128, 4, 16


def arch(preset: str) -> dict:
    width, layers, heads = PRESETS[preset]["arch"]
    return {
        "hidden_size": width,
        "intermediate_size": width * 11 // 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }


def common_overrides(args, out: Path, steps: int) -> list[str]:
    p = PRESETS[args.preset]
    return [
        f"model.arch={json.dumps(arch(args.preset))}",
        f"data.path={args.data}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.global_batch_size={p['batch']}",
        f"train.micro_batch_size={p['batch']}",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.seed=0",
        f"logging.progress={str(not args.quiet).lower()}",
        "logging.log_every=50",
    ]


def train_base(args) -> Path:
    from acomp.config import load_config
    from acomp.train import run

    out = args.out / "base"
    overrides = common_overrides(args, out, PRESETS[args.preset]["base_steps"]) + [
        "compression.summary_length=0",
        "compression.training_substeps=1",
        "compression.segments_per_substep=1",
        f"compression.segment_lengths=[{SEGMENT * N_SEGMENTS}]",
        "compression.segment_gradient_checkpointing=false",
    ]
    return run(load_config(REPO / "configs" / "tiny.yaml", overrides)) / "final"


def train_arm(args, base: Path, name: str, fields: dict) -> Path:
    from acomp.config import load_config
    from acomp.train import run

    overrides = common_overrides(args, args.out / name, PRESETS[args.preset]["steps"]) + [
        f"model.name_or_path={base}",
        "compression.training_substeps=2",
        "compression.segments_per_substep=2",
        f"compression.segment_lengths=[{SEGMENT},{SEGMENT}]",
        "optim.warmup_steps=20",
        *(f"compression.{k}={'null' if v is None else v}" for k, v in fields.items()),
    ]
    return run(load_config(REPO / "configs" / "tiny.yaml", overrides)) / "final"


def evaluate(model_dir: Path, args, **fields) -> dict:
    """The paper's protocol (acomp.eval) on held-out blocks spread over the split: the last segment's
    perplexity behind the three compressed segments before it and with no context, and the mean vectors
    a compressing segment kept (variable arms: stopping as configured)."""
    import torch
    from length_headroom import block_losses

    from acomp import AutoCompressorModel
    from acomp.eval import CorpusBlocks, ProtocolConfig
    from acomp.eval import evaluate as run_protocol

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoCompressorModel.from_pretrained(str(model_dir), **fields).to(device)
    cfg = ProtocolConfig(
        eval_segment=SEGMENT,
        segment_length=SEGMENT,
        max_context_segments=N_SEGMENTS - 1,
        fa_window=0,
        max_blocks=PRESETS[args.preset]["eval_blocks"],
    )
    autocast = torch.autocast(device, torch.bfloat16, enabled=device == "cuda")
    with autocast:
        result = run_protocol(
            model, CorpusBlocks(str(args.data), "val"), cfg, progress=not args.quiet, keep_records=True
        )
    variable = f"summary_variable_{N_SEGMENTS - 1}"
    behind = result.overall.get(variable) or result.overall[f"summary_{N_SEGMENTS - 1}"]
    return {
        "summary_ppl": behind.ppl,
        "no_context_ppl": result.overall["no_context"].ppl,
        "mean_vectors_per_segment": behind.summary_vectors / (N_SEGMENTS - 1),
        "tokens": behind.tokens,
        "blocks": result.blocks,
        "length_loss_spearman": length_follows_content(model, args) if model.variable_length else None,
        # per block: (no-context loss, loss behind one segment's fixed-length summary), for length_headroom
        "block_losses": block_losses(result.records),
    }


def length_follows_content(model, args) -> float | None:
    """Rank correlation of the vectors each compressed segment kept with its text's no-context loss, over the
    same held-out blocks (benchmarks/summary_profile.py); None when every segment kept the same number."""
    from summary_profile import ProfileConfig, profile

    from acomp.eval import CorpusBlocks

    cfg = ProfileConfig(
        segment=SEGMENT,
        segments=N_SEGMENTS - 1,
        max_blocks=PRESETS[args.preset]["eval_blocks"],
        prompt_tokens=SEGMENT // 4,
        new_tokens=1,
    )
    return profile(model, CorpusBlocks(str(args.data), "val"), cfg, time_decode=False)["length_loss_spearman"]


def start_stop_probability(base: Path, args) -> dict:
    """The mean stop probability p(<eoc>) over the summary slots of held-out segments, for a variable model just
    made from the base (its <eoc> LM-head row zeroed, as the trainer makes it) and with the base's own row: how
    far from zero the length penalty's gradient starts (docs/VARIABLE_LENGTH.md, "How lengths move")."""
    import torch
    from transformers import AutoConfig

    from acomp import AutoCompressorModel
    from acomp.eval import CorpusBlocks
    from acomp.train.data import open_corpus
    from acomp.train.engine import control_token_ids

    config = AutoConfig.from_pretrained(base)
    config.update(control_token_ids(open_corpus(str(args.data), None).tokenizer))
    fields = {"compression_mode": "variable", "compression_max_len": MAX_LEN}
    model = AutoCompressorModel.from_pretrained(base, config=config, **fields).eval()
    blocks = CorpusBlocks(str(args.data), "val")
    ids = torch.stack([torch.as_tensor(blocks[i]["input_ids"][:SEGMENT]) for i in range(8)]).long()
    head, eoc = model.get_output_embeddings().weight, model.config.eoc_token_id
    own = AutoCompressorModel.from_pretrained(base).get_output_embeddings().weight[eoc].detach()  # as saved
    probabilities = {}
    with torch.no_grad():
        for name, row in (("zero_row", torch.zeros_like(own)), ("base_row", own)):
            head[eoc] = row
            vectors = model(ids, segment_lengths=[SEGMENT], output_softprompt=True).softprompt
            probabilities[name] = model.lm_head(vectors).softmax(dim=-1)[..., eoc].mean().item()
    return probabilities


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("fixed", "o"), ("variable", "s")):
        arms = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["mean_vectors_per_segment"])
        ax.plot(
            [r["mean_vectors_per_segment"] for r in arms],
            [r["summary_ppl"] for r in arms],
            marker=marker,
            label=mode,
        )
        for r in arms:  # fixed labels above their points, variable ones below: they meet at 1 vector
            offset = (3, 5) if mode == "fixed" else (3, -11)
            xy = (r["mean_vectors_per_segment"], r["summary_ppl"])
            ax.annotate(r["label"], xy, textcoords="offset points", xytext=offset, fontsize=7)
    # The base's no-context level sits far above the arms: in the title, not on the axis.
    ax.set_title(f"no context (base): {results[0]['base_no_context_ppl']:.2f}", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean summary vectors per segment")
    ax.set_ylabel("held-out last-segment perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def headroom_table(results: list[dict]) -> str:
    """The room for learned lengths among the fixed arms (benchmarks/length_headroom.py; nats per token: the
    protocol has no full-attention condition), or nothing with fewer than two fixed lengths."""
    from length_headroom import headroom
    from length_headroom import markdown as headroom_markdown

    fixed = [(r["summary_length"], r["block_losses"]) for r in results if r["mode"] == "fixed"]
    lines = headroom_markdown(headroom(fixed, gap=0.0))
    return "\n\nRoom for learned lengths, one compressed segment:\n\n" + "\n".join(lines) if lines else ""


def markdown(results: list[dict]) -> str:
    rows = [
        "| arm | mode | mean vectors / segment | ppl with summaries | no-context ppl (same model) | "
        "corr(kept, no-context loss) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        corr = r["length_loss_spearman"]
        rows.append(
            f"| {r['label']} | {r['mode']} | {r['mean_vectors_per_segment']:.2f} | {r['summary_ppl']:.3f} "
            f"| {r['no_context_ppl']:.3f} | {'-' if corr is None else f'{corr:.2f}'} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="model size and steps (default: cpu)"
    )
    parser.add_argument("--smoke", action="store_true", help="same as --preset smoke (plumbing check)")
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO / "data" / "stdlib",
        help="corpus (built if missing; default: data/stdlib)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / ".bench" / "variable_study",
        help="output folder (default: .bench/variable_study)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="inference stop threshold (variable arms; default 0.5)"
    )
    parser.add_argument(
        "--stop-rule",
        choices=STOP_RULES,
        default=None,
        help="what the threshold reads (compress_stop_rule): cumulative = the probability that compression has "
        "stopped by that slot, step = each slot's own stop probability; default: the model's (cumulative)",
    )
    parser.add_argument(
        "--lambdas",
        type=non_negative_float,
        nargs="*",
        default=LAMBDAS,
        help="length-penalty sweep (default: 0 0.03 0.1 0.3; given without values: no such arms)",
    )
    parser.add_argument(
        "--fixed",
        type=positive_int,
        nargs="*",
        default=FIXED,
        help="fixed summary lengths (default: 1 2 4 16; given without values: no such arms)",
    )
    parser.add_argument(
        "--training-presence",
        choices=TRAINING_PRESENCE,
        default=CompressionFields.training_presence,
        help="how variable arms train on uncertain vectors (compression.training_presence): sampled = a length "
        f"drawn per segment, soft = every slot weighted by its survival; default {CompressionFields.training_presence}",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: expected a stop probability in [0, 1]")
    if not args.fixed and not args.lambdas:
        parser.error("no arms: give --fixed or --lambdas at least one value")
    if args.smoke:
        args.preset = "smoke"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.chdir(REPO)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.data / "manifest.json").exists():
        from acomp.data import build_corpus

        build_corpus(source="stdlib", out=args.data, train_tokenizer_vocab=2048, block_size=512)

    started = time.time()
    base = train_base(args)
    arms = [(f"k={k}", "fixed", {"summary_length": k}) for k in args.fixed]
    presence = (
        "" if args.training_presence == CompressionFields.training_presence else f"-{args.training_presence}"
    )
    arms += [
        (
            f"lambda={lam:g}{presence}",
            "variable",
            {
                "compression_mode": "variable",
                "compression_max_len": MAX_LEN,
                "compression_lambda": lam,
                "training_presence": args.training_presence,
            },
        )
        for lam in args.lambdas
    ]
    base_eval = evaluate(base, args, summary_length=1)  # its no-context ppl; the summary is untrained
    stop_start = start_stop_probability(base, args)
    results = []
    for label, mode, fields in arms:
        name = label.replace("=", "_")
        model_dir = train_arm(args, base, name, fields)
        inference = (
            {"compress_stop_threshold": args.threshold}
            | ({} if args.stop_rule is None else {"compress_stop_rule": args.stop_rule})
            if mode == "variable"
            else {}
        )
        result = evaluate(model_dir, args, **inference)
        result.update(label=label, mode=mode, base_no_context_ppl=base_eval["no_context_ppl"], **fields)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "block_losses"}), flush=True)
    summary = {
        "preset": args.preset,
        "threshold": args.threshold,
        "stop_rule": args.stop_rule or CompressionFields.compress_stop_rule,
        "segment_length": SEGMENT,
        "segments": N_SEGMENTS,
        "base_no_context_ppl": base_eval["no_context_ppl"],
        "start_stop_probability": stop_start,
        "seconds": time.time() - started,
        "arms": results,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    table = markdown(results) + headroom_table(results)
    (args.out / "results.md").write_text(table + "\n")
    plot(results, args.out / "frontier.png")
    print(table)
    print(
        f"stop probability when variable training starts: {stop_start['zero_row']:.2e} (the base's own <eoc> "
        f"row: {stop_start['base_row']:.2e})"
    )
    print(
        f"base no-context ppl {base_eval['no_context_ppl']:.3f}; wrote {args.out}/results.json, frontier.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
