"""Is the compressed side's prefill (150 summary vectors + a 32-token prompt, Llama-1B shape, bf16) bound by the
GPU or by the host, and could a CUDA graph or torch.compile of it help? Prints one JSON row per batch size:

- `eager2d_*`: the prefill as `generate` runs it (2D mask, DynamicCache): wall time, CUDA-event time, and the
  sum of its kernels' times (torch.profiler); wall >> kernels means host-bound;
- `eager4d_*`: the same with a 4D additive mask (what a captured prefill would need: with a 2D mask
  transformers checks `mask.all()` on the host, which a CUDA graph capture cannot do);
- `graph4d_replay_wall_ms`: that prefill captured in a CUDA graph and replayed; `graph2d_error`: the 2D capture's
  failure; `compile4d_*`: torch.compile of it (after a failed capture in the same process, see RESULTS.md);
- `generate_summary_dynamic1tok_wall_ms`: a whole `generate` call of one token, for reference.

    python benchmarks/prefill_probe.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import context_segments, llama_1b, write_report  # noqa: E402

from acomp import LlamaAutoCompressorModel  # noqa: E402
from acomp.modeling.attention import sdpa_context  # noqa: E402
from acomp.modeling.compressor import attention_bias  # noqa: E402


def wall_ms(fn, n: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def event_ms(fn, n: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def kernel_ms(fn) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(ev.device_time_total for ev in prof.key_averages()) / 1e3


@torch.no_grad()
def probe(model, batch: int) -> dict:
    decoder, config = model.get_decoder(), model.config
    g = torch.Generator(device="cuda").manual_seed(0)
    context = torch.randint(3, 32000, (batch, 6144), device="cuda", generator=g)
    prompt = torch.randint(3, 32000, (batch, 32), device="cuda", generator=g)
    summary = model.compress(context, segment_lengths=context_segments(6144))
    soft = summary.shape[1]
    prompt_mask = torch.ones_like(prompt)
    embeds = torch.cat([summary, model.get_input_embeddings()(prompt)], 1)
    mask2d = torch.ones(batch, soft + 32, dtype=torch.long, device="cuda")
    mask4d = attention_bias(torch.zeros(batch, soft, device="cuda"), prompt_mask, 0, embeds.dtype)
    positions = model.position_rule.segment(soft, prompt_mask, 0)

    def prefill(mask):
        with sdpa_context(config.sdpa_backend, embeds.device):
            return decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=DynamicCache(),
                use_cache=True,
            ).last_hidden_state

    row = {
        "eager2d_wall_ms": wall_ms(lambda: prefill(mask2d)),
        "eager2d_gpu_event_ms": event_ms(lambda: prefill(mask2d)),
        "eager2d_kernel_ms": kernel_ms(lambda: prefill(mask2d)),
        "eager4d_wall_ms": wall_ms(lambda: prefill(mask4d)),
        "eager4d_kernel_ms": kernel_ms(lambda: prefill(mask4d)),
        "generate_summary_dynamic1tok_wall_ms": wall_ms(
            lambda: model.generate(prompt, softprompt=summary, max_new_tokens=1, eos_token_id=[]), n=5
        ),
    }
    for name, mask in (("4d", mask4d), ("2d", mask2d)):
        try:
            torch.cuda.synchronize()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefill(mask)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                prefill(mask)
            row[f"graph{name}_replay_wall_ms"] = wall_ms(graph.replay)
        except Exception as exc:  # noqa: BLE001 - a probe: report and go on
            row[f"graph{name}_error"] = repr(exc)[:300]
    try:
        compiled = torch.compile(prefill, dynamic=False)
        start = time.perf_counter()
        compiled(mask4d)
        torch.cuda.synchronize()
        row["compile4d_first_s"] = time.perf_counter() - start
        row["compile4d_wall_ms"] = wall_ms(lambda: compiled(mask4d))
    except Exception as exc:  # noqa: BLE001
        row["compile4d_error"] = repr(exc)[:300]
    row["batch"] = batch
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1], help="sequences prefilled at once")
    p.add_argument("--out", default=None, help="write the rows to this JSON file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/prefill_probe.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = LlamaAutoCompressorModel(llama_1b(6144 + 400)).to("cuda", torch.bfloat16).eval()
    rows = []
    for batch in args.batch_sizes:
        rows.append(probe(model, batch))
        print(json.dumps(rows[-1]), flush=True)
    write_report(rows, args.out)


if __name__ == "__main__":
    main()
