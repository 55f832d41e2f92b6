"""Is there room for learned summary lengths to beat fixed ones? An upper-bound study from fixed-length runs.

A variable-length model can only beat the fixed frontier if some segments are worth more vectors than others,
and if it can tell which. Fixed-length runs scored on the same held-out blocks (benchmarks/quality.py keeps
each block's NLL per condition in results.json) answer both without training a variable model: for a pair of
lengths k_lo < k_hi, the per-block value of the extra vectors is

    d(b) = gain_hi(b) - gain_lo(b),  gain_k(b) = loss without context - loss behind one segment's k vectors

(each run against its own no-context loss, per token of the scored segment). Giving k_hi to half of the blocks
and k_lo to the rest spends (k_lo + k_hi) / 2 per segment, as the fixed frontier's midpoint does (half of the
segments at each length, chosen blindly). Two choices of the half:

- by content: the blocks whose text is hardest without context (their mean no-context loss over the runs),
  a feature a model sees when it compresses; what it gains over the midpoint is what lengths that follow
  difficulty could win;
- by the oracle: the blocks with the largest d(b), an upper bound for any rule, inflated by noise (each run's
  per-block losses carry its own training noise); runs of the same length with other seeds give that noise's
  share ("oracle between replicates": the same choice where the true value is zero).

All figures are in nats per token of the scored segment and in points of the gap (the runs' mean no-context
minus full-attention loss), with a bootstrap standard error over blocks for the content rule. Run on a
quality.py output directory:

    python benchmarks/length_headroom.py .bench/quality

(`benchmarks/quality.py` also appends this table to `ablation.md` when two or more fixed lengths ran, and
`benchmarks/variable_study.py` to its results.md for its fixed arms.)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from summary_profile import spearman

ONE_SEGMENT = "summary_1"
NO_CONTEXT = "no_context"
BOOTSTRAP = 1000


def block_losses(records: list[dict]) -> dict[int, tuple[float, float]]:
    """Block index -> (loss without context, loss behind one compressed segment), per target token, from the
    protocol's per-block records (acomp.eval's `keep_records`)."""
    losses = {}
    for r in records:
        tokens = r["tokens"][ONE_SEGMENT]
        losses[r["index"]] = (r["nll"][NO_CONTEXT] / tokens, r["nll"][ONE_SEGMENT] / tokens)
    return losses


def gap_nats(results: dict) -> float:
    """The run's no-context minus full-attention loss over all its blocks."""
    rows = {row["name"]: row for row in results["headline"]["rows"]}
    return rows[NO_CONTEXT]["loss"] - rows[results["headline"]["fa"]]["loss"]


def from_results(runs: list[tuple[int, dict]]) -> tuple[list[tuple[int, dict]], float]:
    """(summary_length, results.json) of quality.py runs -> their block losses and the mean gap."""
    losses = [(k, block_losses(results["autocompressor"]["records"])) for k, results in runs]
    return losses, (statistics.fmean(gap_nats(results) for _, results in runs) if runs else 0.0)


def headroom(losses: list[tuple[int, dict]], gap: float, seed: int = 0) -> list[dict]:
    """One row per pair of adjacent lengths among fixed-length runs ((summary_length, block_losses) each, on
    the same blocks); runs of the same length are averaged block by block. `gap` (nats per token) only scales
    the table's shares: 0 where a protocol has no full-attention condition."""
    if len({k for k, _ in losses}) < 2:
        return []
    blocks = sorted(set.intersection(*(set(by_block) for _, by_block in losses)))
    if len(blocks) < 2:
        return []
    difficulty = {b: statistics.fmean(by_block[b][0] for _, by_block in losses) for b in blocks}
    by_length: dict[int, list[dict]] = {}
    for k, by_block in losses:
        by_length.setdefault(k, []).append({b: by_block[b][0] - by_block[b][1] for b in blocks})
    mean_gain = {
        k: {b: statistics.fmean(g[b] for g in gains) for b in blocks} for k, gains in by_length.items()
    }
    noise = replicate_oracle(by_length, blocks)
    lengths = sorted(mean_gain)
    half = len(blocks) // 2
    rng = random.Random(seed)
    rows = []
    for lo, hi in zip(lengths, lengths[1:]):
        value = {b: mean_gain[hi][b] - mean_gain[lo][b] for b in blocks}
        hardest = set(sorted(blocks, key=difficulty.get, reverse=True)[:half])
        content = over_blind(value, hardest, blocks)
        resampled = [over_blind(value, hardest, rng.choices(blocks, k=len(blocks))) for _ in range(BOOTSTRAP)]
        oracle = over_blind(value, set(sorted(blocks, key=value.get, reverse=True)[:half]), blocks)
        rows.append(
            {
                "k_lo": lo,
                "k_hi": hi,
                "blocks": len(blocks),
                "gap": gap,
                "value": statistics.fmean(value.values()),
                "spearman": spearman([difficulty[b] for b in blocks], [value[b] for b in blocks]),
                "content": content,
                "content_se": statistics.stdev(resampled),
                "oracle": oracle,
                "replicate_oracle": noise,
            }
        )
    return rows


def over_blind(value: dict, chosen: set, sample: list[int]) -> float:
    """What giving k_hi to the `chosen` blocks (k_lo elsewhere) gains over giving it to as many blocks blindly,
    on `sample`: the covariance of the extra vectors' value with the choice."""
    picked = [b in chosen for b in sample]
    values = [value[b] for b in sample]
    return statistics.fmean(v * c for v, c in zip(values, picked)) - statistics.fmean(
        values
    ) * statistics.fmean(picked)


def replicate_oracle(by_length: dict[int, list[dict]], blocks: list[int]) -> float | None:
    """What the oracle choice wins between two runs of one length (no true value to find): the mean over the
    pairs of replicates present, or None without any."""
    wins = []
    for gains in by_length.values():
        for i, a in enumerate(gains):
            for b in gains[i + 1 :]:
                diff = {x: a[x] - b[x] for x in blocks}
                wins.append(
                    over_blind(
                        diff, set(sorted(blocks, key=diff.get, reverse=True)[: len(blocks) // 2]), blocks
                    )
                )
    return statistics.fmean(wins) if wins else None


def markdown(rows: list[dict]) -> list[str]:
    """The table: nats per token of the scored segment, and in brackets points of the gap."""
    if not rows:
        return []
    lines = [
        "| lengths k_lo / k_hi | blocks | value of the extra vectors | corr(difficulty, value) | "
        "hardest half at k_hi, over the midpoint | oracle half, over the midpoint | oracle between replicates |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        corr = "-" if r["spearman"] is None else f"{r['spearman']:.2f}"
        value, content, oracle, noise = (
            nats(r[key], r["gap"]) for key in ("value", "content", "oracle", "replicate_oracle")
        )
        lines.append(
            f"| {r['k_lo']} / {r['k_hi']} | {r['blocks']} | {value} | {corr} | "
            f"{content} ± {r['content_se']:.4f} | {oracle} | {noise} |"
        )
    return lines


def nats(x: float | None, gap: float) -> str:
    """x nats per token, and its share of the gap where the gap is positive."""
    if x is None:
        return "-"
    return f"{x:+.4f}" + (f" ({x / gap:+.1%})" if gap > 0 else "")


def fixed_runs(root: Path) -> list[tuple[int, dict]]:
    """The fixed-length runs of a quality.py output directory that changed only their length or seed (the
    frontier's runs, from ablation.json) and kept per-block records."""
    from quality import LENGTH_SETTINGS

    runs = []
    for row in json.loads((root / "ablation.json").read_text()):
        if row["mode"] != "fixed" or any(key not in LENGTH_SETTINGS for key in row["changes"]):
            continue
        path = (
            root / "results.json" if row["arm"] == "default" else root / "arms" / row["arm"] / "results.json"
        )
        results = json.loads(path.read_text())
        if results["autocompressor"].get("records"):
            runs.append((int(results["settings"]["summary_length"]), results))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a benchmarks/quality.py output directory (with ablation.json)")
    args = p.parse_args(argv)
    if not (args.out / "ablation.json").is_file():
        p.error(
            f"{args.out}: no ablation.json (run benchmarks/quality.py --stage eval with two or more runs)"
        )
    runs = fixed_runs(args.out)
    if len({k for k, _ in runs}) < 2:
        p.error(f"{args.out}: fewer than two fixed lengths with per-block records")
    print("\n".join(markdown(headroom(*from_results(runs)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
