"""Compressed generation: compress a long document once, keep its summary vectors on disk, answer later.

    # 1. compress (once): the document -> summary vectors + metadata in one .pt file
    python examples/compressed_generation.py compress --model runs/tiny/final --out argparse.summary.pt
    # 2. answer (any time later, any number of prompts): generate behind the saved summary vectors
    python examples/compressed_generation.py answer --summary argparse.summary.pt --compare
    python examples/compressed_generation.py answer --summary argparse.summary.pt --prompt "def parse_args(" --max-new-tokens 60

`compress` reads the document (default: the stdlib's argparse.py), tokenizes it with the model's tokenizer
and compresses its first `--segments` segments of `--segment-length` tokens (accumulating: the softprompt
holds summary_length vectors per segment; a variable-length model keeps as many as it decides, and only those
are saved unless `--padded`). The file stores the vectors (fp32) and what is needed to use them: the model
they belong to, the lengths, and the text that follows the compressed part (the default prompt). `answer`
loads the model named there (or --model), checks the vectors fit it, and calls
`model.generate(prompt_ids, softprompt=...)`; `--compare` also generates without them.
Runs on CPU with the demo's model (`make demo` writes runs/tiny/final) or any AutoCompressor (a plain base
model loads too, with a warning: its summary tokens are untrained).
Exit status: 0 done; 2 bad input, one `error:` line naming it (a missing file, a model that cannot be loaded,
vectors of another model, a prompt that does not fit the model's positions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from acomp.cli import positive_float, positive_int  # noqa: E402  (after the repository is on the path)

FORMAT = 2  # 2 adds the positions of compacted vectors; files of format 1 still load


class UsageError(Exception):
    """Bad input (a missing file, a model that cannot be loaded, a prompt too long): one line, exit 2."""


def default_document() -> str:
    from acomp.data import stdlib_root

    return str(stdlib_root() / "argparse.py")


def load(model_path: str):
    """The AutoCompressor and its tokenizer (saved beside it, as the trainer's export does)."""
    import torch
    from transformers import AutoTokenizer

    from acomp import AutoCompressorModel
    from acomp.train.preflight import missing_model_dir, short_reason

    if missing_model_dir(model_path):
        raise UsageError(f"--model {model_path}: no such model directory")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        model, info = AutoCompressorModel.from_pretrained(model_path, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--model {model_path}: cannot load the model and its tokenizer ({short_reason(e)})"
        ) from None
    if model.config.summary_length and "embed_summary.weight" in info["missing_keys"]:
        print(
            f"warning: {model_path} has no trained summary table (embed_summary.weight; a plain base model?): "
            "its summary vectors come from untrained summary tokens and carry little of the document",
            file=sys.stderr,
        )
    model.eval()
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tokenizer


def positions_budget(model, segment: int) -> int:
    """How many segments can be compressed before the softprompt, a segment and its summary tokens
    outgrow the model's positions (RoPE families number softprompt and summary tokens too)."""
    kappa = model.config.summary_length
    max_pos = model.config.max_position_embeddings
    if not model.position_rule.softprompt_consumes_positions:
        return 10**9
    return max(0, (max_pos - segment - kappa) // max(kappa, 1))


def compress(args) -> int:
    import torch

    if not Path(args.document).is_file():
        why = "not a regular file" if Path(args.document).exists() else "no such file"
        raise UsageError(f"--document {args.document}: {why}")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory: give the summary file's name")
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot create its directory ({e.strerror or e})") from None
    model, tok = load(args.model)
    if model.config.summary_length == 0:
        raise UsageError(f"{args.model} has summary_length 0: it cannot compress")
    text = Path(args.document).read_text(encoding="utf-8", errors="replace")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    segment = args.segment_length or min(2048, model.config.max_position_embeddings // 4)
    wanted = args.segments
    fit = min(wanted, ids.shape[1] // segment - 1, positions_budget(model, segment))
    if fit < 1:
        raise UsageError(
            f"{args.document} has {ids.shape[1]} tokens: too short for one {segment}-token segment plus a prompt "
            "(lower --segment-length)"
        )
    if fit < wanted:
        print(f"note: compressing {fit} segments, not {wanted} (document length or the model's positions)")
    lengths = [segment] * fit
    context = ids[:, : sum(lengths)].to(model.device)
    memory = model.compress_context(context, segment_lengths=lengths)
    summary = memory.summary if args.padded else memory.summary.compact()
    following = tok.decode(ids[0, sum(lengths) : sum(lengths) + args.prompt_tokens])
    record = {
        "format": FORMAT,
        "softprompt": summary.vectors.float().cpu(),
        "softprompt_bias": None if summary.bias is None else summary.bias.cpu(),
        "softprompt_positions": None if summary.positions is None else summary.positions.cpu(),
        "softprompt_span": summary.span,
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "hidden_size": model.config.hidden_size,
        "summary_length": model.config.summary_length,
        "document": str(args.document),
        "document_tokens": int(ids.shape[1]),
        "segment_lengths": lengths,
        "compressed_tokens": sum(lengths),
        "continuation": following,
    }
    torch.save(record, args.out)
    print(
        f"compressed {sum(lengths)} of {ids.shape[1]} tokens of {args.document} into "
        f"{describe(summary)} -> {args.out}"
    )
    return 0


def answer(args) -> int:
    import torch

    from acomp import Softprompt

    if not Path(args.summary).is_file():
        raise UsageError(f"--summary {args.summary}: no such file (write one with `compress --out`)")
    try:
        record = torch.load(args.summary, map_location="cpu", weights_only=False)
    except Exception:  # not a torch file at all: the check below names it
        record = None
    if not isinstance(record, dict) or record.get("format") not in (1, FORMAT):
        raise UsageError(f"{args.summary} is not a summary file written by `compress` (format 1 or {FORMAT})")
    model_path = args.model or record["model"]
    model, tok = load(model_path)
    if model.config.hidden_size != record["hidden_size"]:
        raise UsageError(
            f"the summary vectors are {record['hidden_size']} wide but {model_path} has hidden_size "
            f"{model.config.hidden_size}: they belong to {record['model']}"
        )
    prompt = record["continuation"] if args.prompt is None else args.prompt
    prompt_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    if prompt_ids.shape[1] == 0:
        raise UsageError("the prompt is empty")
    summary = Softprompt(
        record["softprompt"],
        record["softprompt_bias"],
        record.get("softprompt_positions"),
        record.get("softprompt_span"),
    ).to(model.device)
    check_positions(model, model_path, summary, prompt_ids.shape[1], args.max_new_tokens)
    if args.decoding == "cuda_graph" and model.device.type != "cuda":
        raise UsageError(f"--decoding cuda_graph needs a CUDA GPU; the model is on {model.device}")
    if args.compile_step and args.decoding == "dynamic":
        raise UsageError("--compile-step needs --decoding static or cuda_graph")
    if args.freeze_weights and not args.compile_step:
        raise UsageError("--freeze-weights needs --compile-step")
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        decoding=args.decoding,
        compile_step=args.compile_step,
        freeze_weights=args.freeze_weights,
    )
    if args.sample:
        options["generator"] = torch.Generator(device=model.device).manual_seed(args.seed)
    out = model.generate(prompt_ids, softprompt=summary, **options)
    print(f"[{describe(summary)} of {record['compressed_tokens']} tokens of {record['document']}]")
    print(f"prompt: {prompt!r}")
    print(f"with summary vectors: {tok.decode(out[0, prompt_ids.shape[1] :])!r}")
    if args.compare:
        if args.sample:
            options["generator"] = torch.Generator(device=model.device).manual_seed(args.seed)
        plain = model.generate(prompt_ids, **options)
        print(f"without:              {tok.decode(plain[0, prompt_ids.shape[1] :])!r}")
    return 0


def describe(summary) -> str:
    """'48 summary vectors', or for a padded variable-length softprompt '48 slots, 3 summary vectors kept'."""
    from acomp.modeling.softprompt import is_absent

    if summary.bias is None:
        return f"{summary.length} summary vectors"
    return f"{summary.length} slots, {int((~is_absent(summary.bias)).sum())} summary vectors kept"


def check_positions(model, model_path: str, summary, prompt_tokens: int, new_tokens: int) -> None:
    """Prompt, generated tokens and (RoPE families) the summary vectors' positions must fit the model's
    positions: beyond them a RoPE model runs on positions it never saw and an OPT model has no embedding."""
    taken = summary.span if model.position_rule.softprompt_consumes_positions else 0
    limit = model.config.max_position_embeddings
    needed = taken + prompt_tokens + new_tokens - 1  # the last new token is never fed back
    if needed > limit:
        raise UsageError(
            f"the prompt has {prompt_tokens} tokens: with {taken} summary positions and --max-new-tokens "
            f"{new_tokens} that is {needed} positions, more than the {limit} of "
            f"{model_path}; shorten the prompt (compress a long text with `compress` instead)"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a document into summary vectors saved to a file")
    c.add_argument(
        "--model",
        default=str(REPO / "runs" / "tiny" / "final"),
        help="AutoCompressor dir or hub name (default: runs/tiny/final, the demo's model)",
    )
    c.add_argument(
        "--document", default=None, help="text file to compress (default: the stdlib's argparse.py)"
    )
    c.add_argument("--out", required=True, help="where to save the summary vectors (.pt)")
    c.add_argument(
        "--segment-length",
        type=positive_int,
        default=None,
        help="tokens per compressed segment (default: max_position_embeddings / 4, at most 2048)",
    )
    c.add_argument(
        "--segments",
        type=positive_int,
        default=3,
        help="segments to compress from the start of the document (default 3)",
    )
    c.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=24,
        help="tokens after the compressed part kept as the default prompt (default 24)",
    )
    c.add_argument(
        "--padded",
        action="store_true",
        help="variable-length models: save every slot of each segment, the absent ones marked by a bias "
        "(default: only the vectors the model kept)",
    )
    a = sub.add_parser("answer", help="generate behind summary vectors saved by `compress`")
    a.add_argument("--summary", required=True, help="file written by `compress`")
    a.add_argument("--model", default=None, help="model to use (default: the one that wrote the vectors)")
    a.add_argument(
        "--prompt", default=None, help="prompt text (default: the text that follows the compressed part)"
    )
    a.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens to generate (default 40)")
    a.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    a.add_argument(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="sampling temperature (with --sample; default 1.0)",
    )
    a.add_argument("--seed", type=int, default=0, help="sampling seed (with --sample; default 0)")
    a.add_argument("--compare", action="store_true", help="also generate without the summary vectors")
    a.add_argument(
        "--decoding",
        default="dynamic",
        choices=["dynamic", "static", "cuda_graph"],
        help="KV cache and step mode (same tokens): dynamic (default), static, or cuda_graph (GPU; fastest)",
    )
    a.add_argument(
        "--compile-step",
        action="store_true",
        help="torch.compile the decode step (with --decoding static/cuda_graph; pays off over many tokens or calls)",
    )
    a.add_argument(
        "--freeze-weights",
        action="store_true",
        help="compile the step with the weights as constants: q/k/v and gate/up become one GEMM each "
        "(with --compile-step; projections that share an input run as one GEMM: faster steps, more memory)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            args.document = args.document or default_document()
            return compress(args)
        return answer(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
