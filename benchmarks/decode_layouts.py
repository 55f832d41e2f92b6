"""Decoding behind summaries of different layouts: what a variable-length model's compact summaries cost per
generated token against fixed summary lengths, and what part of that cost is the presence bias.

The quality benchmark's model shape (random init, bf16; the frontier's model in benchmarks/RESULTS.md) behind
the summaries of 3 compressed segments, each layout built directly (decode time depends on shapes, not on
trained weights):
- `fixed-50` / `fixed-5`: 150 / 15 vectors, no bias (fixed k=50 and k=5);
- `variable-padded`: every sample keeps a random number of vectors per segment (uniform in --kept), all 150
  slots held and the absent ones masked by a bias (what `compress_context` returns before `compact()`);
- `variable-compact`: the same summaries compacted (padded to the batch's longest, a bias on the padding);
- `variable-equal`: every sample keeps the same number (the mean of --kept): compact with no bias at all.
Each row: ms per generated token (greedy, exactly --new-tokens after a --prompt-len prompt, best of 2 after a
warm-up) per `--decoding` mode, and the KV cache per sample at the end.

    python benchmarks/decode_layouts.py --out $OUT/decode.json
    python benchmarks/decode_layouts.py --smoke    # CPU, a tiny model: the same code paths in seconds (tests)
"""

from __future__ import annotations

import argparse

import torch
from inference import (
    DECODING_ARGS,
    decoding_modes,
    empty_cache,
    keep_partial,
    prepare_decoding,
    timed,
    write_report,
)
from quality import QualitySettings
from summary_profile import kv_bytes_per_token
from transformers import LlamaConfig

from acomp import LlamaAutoCompressorModel
from acomp.cli import positive_int
from acomp.modeling.softprompt import Softprompt
from acomp.modeling.variable import absent_bias

SEGMENTS = 3  # the protocol's compressed segments before the scored one (3 x 50 = the paper's 150 vectors)
LAYOUTS = ["fixed-50", "variable-padded", "variable-compact", "variable-equal", "fixed-5"]


def model_config(smoke: bool) -> LlamaConfig:
    settings = QualitySettings()
    arch = dict(settings.arch, vocab_size=settings.vocab)
    if smoke:
        arch.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512)  # fmt: skip
    return LlamaConfig(
        **arch, max_position_embeddings=settings.window, bos_token_id=1, eos_token_id=2, summary_length=50
    )


def layout(name: str, batch: int, width: int, kept: tuple[int, int]) -> Softprompt:
    """The summaries of SEGMENTS segments (50 slots each) in layout `name`, [batch, P, width] vectors; the same
    draw for every layout (variable-padded and variable-compact hold the same summaries)."""
    slots = 50
    generator = torch.Generator().manual_seed(batch)
    vectors = 0.02 * torch.randn(batch, SEGMENTS * slots, width, generator=generator)
    if name.startswith("fixed-"):
        k = int(name.removeprefix("fixed-"))
        return Softprompt(vectors[:, : SEGMENTS * k])
    low, high = kept
    if name == "variable-equal":
        counts = torch.full((batch, SEGMENTS), (low + high) // 2)
    else:
        counts = torch.randint(low, high + 1, (batch, SEGMENTS), generator=generator)
    slot = torch.arange(slots)
    present = (slot[None, None, :] < counts[..., None]).reshape(batch, SEGMENTS * slots)
    bias = torch.where(present, 0.0, absent_bias(torch.float32))
    softprompt = Softprompt(vectors, bias)
    return softprompt if name == "variable-padded" else softprompt.compact()


@torch.no_grad()
def run(args) -> list[dict]:
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model = LlamaAutoCompressorModel(model_config(args.smoke)).to(device, dtype).eval()
    per_token = kv_bytes_per_token(model)
    rows = []
    for batch in args.batch_sizes:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
        for name in args.layouts:
            summary = layout(name, batch, model.config.hidden_size, tuple(args.kept)).to(device)
            kept = summary.length if summary.bias is None else int((summary.bias == 0).sum()) / batch
            row = {
                "batch": batch,
                "layout": name,
                "slots": summary.length,
                "kept_vectors_mean": kept,
                "bias": summary.bias is not None,
                "kv_bytes_per_sample": per_token * (summary.length + args.prompt_len + args.new_tokens),
            }
            for mode in args.decoding:
                gen = {**DECODING_ARGS[mode], "max_new_tokens": args.new_tokens, "eos_token_id": []}
                seconds, _ = timed(model.generate, prompt, softprompt=summary, repeats=2, **gen)
                row[f"ms_per_token_{mode}"] = 1000 * seconds / args.new_tokens
                empty_cache()
            rows.append(row)
            keep_partial(row, args.out)
            print(
                " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--layouts",
        nargs="+",
        default=LAYOUTS,
        choices=LAYOUTS,
        help="summary layouts to time (default: all)",
    )
    p.add_argument(
        "--kept",
        type=int,
        nargs=2,
        default=[2, 6],
        metavar=("LOW", "HIGH"),
        help="variable layouts: vectors kept per segment, uniform in [LOW, HIGH] per sample and segment (default "
        "2 6: a mean of 4, about what lambda 0.2 kept in the GPU frontier study); variable-equal keeps the mean",
    )
    p.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=[1, 8],
        help="sequences generated at once (default 1 8)",
    )
    p.add_argument(
        "--decoding",
        nargs="+",
        default=None,
        choices=list(DECODING_ARGS),
        help="decoding modes to time (benchmarks/inference.py); default dynamic, static and cuda_graph (smoke: "
        "dynamic and static)",
    )
    p.add_argument(
        "--new-tokens",
        type=positive_int,
        default=128,
        help="tokens generated per call (default 128, as the quality profile)",
    )
    p.add_argument(
        "--prompt-len", type=positive_int, default=32, help="prompt tokens after the summaries (default 32)"
    )
    p.add_argument("--out", default=None, help="write all rows to this JSON file")
    p.add_argument(
        "--smoke", action="store_true", help="CPU, a tiny model, batch 2, 4 new tokens (dynamic, static)"
    )
    args = p.parse_args(argv)
    if args.kept[0] < 0 or args.kept[1] < args.kept[0] or args.kept[1] > 50:
        p.error(f"--kept {args.kept[0]} {args.kept[1]}: expected 0 <= LOW <= HIGH <= 50")
    args.decoding = decoding_modes(p, args, ["dynamic", "static", "cuda_graph"])
    if args.smoke:
        args.batch_sizes, args.new_tokens, args.prompt_len = [2], 4, 4
    settings = prepare_decoding(args.decoding)
    write_report(run(args), args.out, {**settings, "kept": args.kept, "segments": SEGMENTS})


if __name__ == "__main__":
    main()
