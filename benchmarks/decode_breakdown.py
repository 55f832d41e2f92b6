"""Where the time of one fixed-shape `generate` call goes, phase by phase, on both sides of
benchmarks/inference.py (after 150 summary vectors, after the full context).

Phases of a call (timed on the host with a device sync at each boundary, so the phases add up to the call):
- `prefill_s`: from the call to the static cache's creation (prompt encoding, first token);
- `setup_s`: the static cache allocated and the prefill's keys/values copied in;
- `capture_s`: warm-up and capture of the CUDA graph (`cuda_graph` / `compiled` modes);
- `loop_s`: every other decode step.
Then `replay_ms`: one replay of the captured step alone (CUDA events over 50 back-to-back replays), the GPU
time a step cannot go below; `host_ms_per_step` = loop time per step - replay time, what the Python loop
around the replay adds. The synchronisations slow the call slightly (`generate_s` is the untimed-phase run).
`--eos` stops at the config's EOS id, so the loop also reads the EOS flag (by default no EOS, as in inference.py).
`held_after_first_call_mb`: GPU memory the first call (the one that compiles) leaves allocated once its own
buffers are freed: with `frozen`, the concatenated weights that its graph keeps as constants.

    python benchmarks/decode_breakdown.py --batch-sizes 1 32 --decoding cuda_graph compiled --out $OUT/breakdown.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import (  # noqa: E402
    DECODING_ARGS,
    context_segments,
    generate_kwargs,
    llama_1b,
    prepare_decoding,
    write_report,
)

from acomp import LlamaAutoCompressorModel  # noqa: E402
from acomp.modeling import generation  # noqa: E402


class PhaseClock:
    """Host timestamps (after a device sync) at the static step's creation (none when a kept step is reused),
    its loading with the call's prefill, and its capture."""

    def __init__(self):
        self.marks, self.steps = {}, []
        step_class = generation._StaticStep
        init, load, capture = step_class.__init__, step_class.load, step_class._capture
        clock = self

        # `static_step`, not `step`: _StaticStep takes a `step` argument of its own.
        def timed_init(static_step, *args, **kwargs):
            clock.mark("setup_start")
            init(static_step, *args, **kwargs)

        def timed_load(static_step, *args, **kwargs):
            if "setup_start" not in clock.marks:  # a kept step: no allocation
                clock.mark("setup_start")
            load(static_step, *args, **kwargs)
            clock.mark("setup_end")
            clock.steps.append(static_step)

        def timed_capture(static_step):
            clock.mark("capture_start")
            capture(static_step)
            clock.mark("capture_end")

        step_class.__init__, step_class.load, step_class._capture = timed_init, timed_load, timed_capture

    def start(self) -> None:
        self.marks.clear()
        self.mark("start")

    def mark(self, name: str) -> None:
        torch.cuda.synchronize()
        self.marks[name] = time.perf_counter()

    def phases(self) -> dict:
        m = self.marks
        capture = m["capture_end"] - m["capture_start"] if "capture_start" in m else 0.0
        return {
            "prefill_s": m["setup_start"] - m["start"],
            "setup_s": m["setup_end"] - m["setup_start"],
            "capture_s": capture,
            "loop_s": m["end"] - m["setup_end"] - capture,
        }


def rewind(step, steps: int) -> None:
    """Move the finished call's step back by `steps` tokens, so as many replays stay within its buffers."""
    for counter in (step.position, step.cache_position, step.record.index):
        counter -= steps


def replay_ms(step, iters: int = 50) -> float:
    """GPU time of one replay of the step's captured graph (rewound first: each replay advances it)."""
    rewind(step, iters + 1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    step.graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        step.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_table(step, iters: int = 20, rows: int = 25) -> str:
    """The GPU kernels of `iters` replays of the step's graph, by total time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    rewind(step, iters)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step.graph.replay()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


@torch.no_grad()
def measure(
    model, clock, prompt, summary, new_tokens: int, mode: str, profile: bool = False, eos: bool = False
) -> dict:
    # Without `eos` no EOS id: exactly new_tokens tokens, as in benchmarks/inference.py.
    gen = generate_kwargs(mode, max_new_tokens=new_tokens, eos_token_id=None if eos else [])
    clock.steps.clear()
    held_before = torch.cuda.memory_allocated()
    model.generate(prompt, softprompt=summary, **gen)  # warm-up: compile, kernel choice, allocator
    torch.cuda.synchronize()
    clock.steps.clear()  # drops the warm-up call's static cache
    held_mb = (torch.cuda.memory_allocated() - held_before) / 2**20
    start = time.perf_counter()
    model.generate(prompt, softprompt=summary, **gen)
    torch.cuda.synchronize()
    plain = time.perf_counter() - start
    clock.steps.clear()
    clock.start()
    out = model.generate(prompt, softprompt=summary, **gen)
    clock.mark("end")
    row = {"generate_s": plain, **clock.phases(), "held_after_first_call_mb": held_mb, "eos": eos}
    row["new_tokens"] = out.shape[1] - prompt.shape[1]
    step = clock.steps[-1]
    if step.graph is not None:
        row["replay_ms"] = replay_ms(step)
        row["host_ms_per_step"] = row["loop_s"] * 1e3 / (row["new_tokens"] - 1) - row["replay_ms"]
        if profile:
            print(kernel_table(step), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=6144, help="context tokens (the full-attention side)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="sequences generated at once")
    p.add_argument(
        "--decoding",
        nargs="+",
        default=["cuda_graph", "compiled"],
        choices=[m for m in DECODING_ARGS if m != "dynamic"],
        help="fixed-shape decoding modes to break down (as in benchmarks/inference.py)",
    )
    p.add_argument("--sides", nargs="+", default=["summary", "full"], choices=["summary", "full"])
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens after the context")
    p.add_argument(
        "--inductor",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="torch._inductor.config settings for the compiled step, e.g. coordinate_descent_tuning=True, "
        "triton.enable_pdl=True",
    )
    p.add_argument(
        "--eos",
        action="store_true",
        help="stop at the config's EOS id as a real call does (the loop then reads an EOS flag from the GPU); "
        "by default no EOS, as in benchmarks/inference.py",
    )
    p.add_argument("--profile", action="store_true", help="print the kernels of 20 replays of each step")
    p.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode_breakdown.py needs a CUDA GPU")
    for setting in args.inductor:
        key, value = setting.split("=", 1)
        *path, name = key.split(".")  # e.g. triton.enable_pdl
        setattr(functools.reduce(getattr, path, torch._inductor.config), name, json.loads(value.lower()))
    settings = prepare_decoding(args.decoding)
    model = LlamaAutoCompressorModel(llama_1b(args.context + args.prompt_len + args.new_tokens + 64))
    model = model.to("cuda", torch.bfloat16).eval()
    clock = PhaseClock()
    rows = []
    for batch in args.batch_sizes:
        g = torch.Generator(device="cuda").manual_seed(0)
        context = torch.randint(3, 32000, (batch, args.context), device="cuda", generator=g)
        prompt = torch.randint(3, 32000, (batch, args.prompt_len), device="cuda", generator=g)
        summary = model.compress(context, segment_lengths=context_segments(args.context))
        inputs = {"summary": (prompt, summary), "full": (torch.cat([context, prompt], dim=1), None)}
        for mode in args.decoding:
            for side in args.sides:
                row = {"batch": batch, "mode": mode, "side": side, "context": args.context}
                row.update(
                    measure(model, clock, *inputs[side], args.new_tokens, mode, args.profile, args.eos)
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_report(rows, args.out, settings)


if __name__ == "__main__":
    main()
