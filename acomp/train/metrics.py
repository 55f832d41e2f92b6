"""Per-step metrics: FLOPs and MFU, memory, and the sinks (metrics.jsonl, wandb, the console).

MFU (model FLOPs utilisation) counts what the model must compute, not what we recompute
(docs/PERFORMANCE.md derives it):

    FLOPs per sequence = sum over segments s of  (6 N_train + 4 N_frozen) T_s  +  12 L a C(T_s)
    T_s    = P_s + n_s + k_s   (softprompt vectors + text tokens + summary tokens of that segment's forward;
                                variable mode trains on every slot: k_s = compression_max_len + 1)
    C(T)   = T (T + 1) / 2     (causal query-key pairs, every position attending to itself and all before it)
    MFU    = FLOPs per step / (step seconds * world size * peak FLOP/s per device)

N_train / N_frozen = trainable / frozen parameters that multiply every position (all but input embedding
tables; the LM head counts, also when tied): 2 FLOPs per parameter in the forward, 2 for the activation
gradient, 2 for the weight gradient, which frozen weights (LoRA's base) do not need. L = layers, a = query
heads x head dim (the hidden size for most models). Attention has no weights: QK^T and AV cost 4 a FLOPs per
causal pair in the forward and twice that in backward. Summary and softprompt positions are included,
activation recomputation (per-segment checkpointing, the chunked loss) is not. With `causal=False` the
attention term is 12 L a T^2 (PaLM's convention: all pairs). Peak: `train.peak_tflops`, else looked up from
the GPU name (bf16 dense: H100/H200 989, A100 312, ...); on CPU MFU is not reported unless peak_tflops is set.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from acomp.progress import Progress
from acomp.train.segments import passed_vectors, sequence_positions, summary_positions

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops_per_device(configured_tflops: float | None, device: torch.device) -> float | None:
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def segment_flops(
    n_params: int, n_layers: int, width: int, seq_len: int, n_frozen: int = 0, causal: bool = True
) -> float:
    """Training FLOPs (forward + backward) of one forward over `seq_len` positions: `n_params` trainable
    and `n_frozen` frozen weights per position, and causal attention of `n_layers` layers whose queries are
    `width` wide (heads x head dim); `causal=False` counts all T^2 pairs (PaLM)."""
    pairs = seq_len * (seq_len + 1) / 2 if causal else float(seq_len) * seq_len
    return (6.0 * n_params + 4.0 * n_frozen) * seq_len + 12.0 * n_layers * width * pairs


def attention_width(config) -> int:
    """Query heads x head dim of a transformers config (the hidden size unless head_dim says otherwise)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


@dataclass
class FlopModel:
    """What MFU needs to know about the model; `per_sequence` is the one FLOP count the trainer's metrics
    and benchmarks/train_throughput.py both use."""

    n_trainable: int
    n_frozen: int
    n_layers: int
    width: int  # query heads x head dim
    summary_length: int  # vectors a segment passes on
    accumulate: bool
    causal: bool = True
    summary_positions: int | None = None  # positions of a segment's summary tokens (default summary_length)

    @classmethod
    def of(cls, model, cfg, causal: bool = True) -> FlopModel:
        """From a (DeepSpeed / peft wrapped) AutoCompressor and its run config."""
        from acomp.train.engine import flop_param_split, unwrap

        config = unwrap(model).config
        trainable, frozen = flop_param_split(model)
        return cls(
            n_trainable=trainable,
            n_frozen=frozen,
            n_layers=config.num_hidden_layers,
            width=attention_width(config),
            summary_length=passed_vectors(cfg.compression),
            accumulate=cfg.compression.accumulate_summary,
            causal=causal,
            summary_positions=summary_positions(cfg.compression),
        )

    @property
    def n_params(self) -> int:
        return self.n_trainable + self.n_frozen

    def per_sequence(self, segment_lengths: list[list[int]]) -> float:
        """Training FLOPs of one sequence cut into `segment_lengths` ([substep][segment])."""
        positions = sequence_positions(
            segment_lengths, self.summary_length, self.accumulate, self.summary_positions
        )
        return sum(
            segment_flops(self.n_trainable, self.n_layers, self.width, t, self.n_frozen, self.causal)
            for t in positions
        )


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory since the last call (GPU), or the process's peak resident set (CPU)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLog:
    """Rank 0 writes one JSON line per optimizer step to metrics.jsonl and mirrors it to wandb and the
    console: a line every `logging.log_every` steps, and (`logging.progress`) a progress bar on a terminal."""

    def __init__(self, output_dir: Path, cfg, is_main: bool, start_step: int, total_steps: int):
        self.is_main = is_main
        self.log_every = cfg.logging.log_every
        self.total_steps = total_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb = None
        # every=0: off a terminal the per-step lines below are the progress (no second kind of line)
        self.progress = Progress(
            total_steps,
            "train",
            "step",
            initial=start_step,
            enabled=is_main and cfg.logging.progress,
            every=0,
        )
        if not is_main:
            return
        _truncate_after(self.path, start_step)  # a resumed run redoes the steps after its checkpoint
        self.file = open(self.path, "a")
        if cfg.logging.wandb != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.logging.run_name,
                mode=cfg.logging.wandb,
                dir=str(output_dir),
                config=cfg.to_dict(),
                resume="allow",
            )

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(self._for_wandb(record), step=record["step"])
        self.progress.update(1, loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        if record["step"] % self.log_every == 0 or "eval_summary_ppl" in record:
            self.write(_format(record, self.total_steps))

    def _for_wandb(self, record: dict) -> dict:
        """The record as wandb takes it: the summary-length shares become a histogram over lengths 0..max."""
        logged = {k: v for k, v in record.items() if k not in ("step", "summary_length_hist")}
        shares = record.get("summary_length_hist")
        if shares is not None:
            import numpy as np
            import wandb

            edges = np.arange(len(shares) + 1) - 0.5
            logged["summary_length_hist"] = wandb.Histogram(np_histogram=(np.asarray(shares), edges))
        return logged

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar (rank 0 only)."""
        if self.is_main:
            self.progress.write(line)

    def close(self) -> None:
        if not self.is_main:
            return
        self.progress.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _format(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts.append(f"tok/s {record['tokens_per_s']:.0f}")
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.3f}")
    parts.append(f"mem {record['memory_gib']:.2f}GiB")
    if "summary_length_hist" in record:
        parts.append(f"summary len {record['summary_length']:.2f}")
    if "eval_summary_ppl" in record:
        parts.append(
            f"held-out ppl: no context {record['eval_no_context_ppl']:.2f}, "
            f"summary vectors {record['eval_summary_ppl']:.2f}"
        )
    return " | ".join(parts)


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in keep))
