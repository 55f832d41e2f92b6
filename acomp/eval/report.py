"""An EvalResult as a JSON file, a markdown table and a plot (perplexity vs context tokens per condition)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from acomp.eval.protocol import (
    FULL_ATTENTION,
    NO_CONTEXT,
    SUMMARY,
    SUMMARY_VARIABLE,
    EvalResult,
    gap_share,
)

LABELS = {
    NO_CONTEXT: "no context",
    SUMMARY: "summary vectors",
    SUMMARY_VARIABLE: "summary vectors (variable length)",
    FULL_ATTENTION: "full attention",
}


def gap_shares(result: EvalResult) -> dict[str, dict[str, float]]:
    """For each summary condition: the share of the no-context -> longest-FA gap it closes, on loss and ppl.
    Empty when there is no full-attention condition."""
    fa = [c for c in result.conditions if c.kind == FULL_ATTENTION]
    if not fa:
        return {}
    best = max(fa, key=lambda c: c.context_tokens).name
    return {
        c.name: {
            "vs": best,
            "loss": gap_share(result, c.name, best, on="loss"),
            "ppl": gap_share(result, c.name, best, on="ppl"),
        }
        for c in result.conditions
        if c.kind in (SUMMARY, SUMMARY_VARIABLE)
    }


def to_dict(result: EvalResult, meta: dict | None = None) -> dict:
    """Everything needed to read or re-plot the result; NaN becomes null (strict JSON)."""
    data = {
        "meta": meta or {},
        "protocol": asdict(result.config),
        "targets": (
            f"the last eval_segment - 1 = {result.plan.eval_segment - 1} tokens of each block "
            "(every position of the final segment predicting the next token inside it)"
        ),
        "plan": {
            "fa_window": result.plan.fa_window,
            "summary_per_segment": result.plan.summary_per_segment,
            "warnings": result.plan.warnings,
        },
        "blocks": result.blocks,
        "blocks_selected": result.blocks_selected,
        "world_size": result.world_size,
        "seconds": result.seconds,
        "conditions": [
            {
                "name": c.name,
                "kind": c.kind,
                "context_tokens": c.context_tokens,
                "context_segments": list(c.context_segments),
                "stop_threshold": c.stop_threshold,
                "overall": result.overall[c.name].to_dict(),
                "domains": {d: stats[c.name].to_dict() for d, stats in result.domains.items()},
            }
            for c in result.conditions
        ],
        "gap_share": gap_shares(result),
    }
    if result.records:
        data["records"] = result.records
    return finite_json(data)


def finite_json(value):
    """`value` with every non-finite float replaced by None, so json.dumps writes strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def write_json(result: EvalResult, path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(result, meta), indent=2) + "\n")
    return path


def markdown(result: EvalResult, title: str | None = None) -> str:
    """One row per condition: context, summary vectors, overall ppl and per-domain ppl, then token counts."""
    domains = list(result.domains)
    head = ["condition", "context tokens", "summary vectors", "ppl (all)"] + [f"ppl {d}" for d in domains]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (1 + len(domains))]
    for c in result.conditions:
        stat = result.overall[c.name]
        vectors = f"{stat.summary_vectors:.1f}" if c.kind in (SUMMARY, SUMMARY_VARIABLE) else "-"
        row = [_label(c), str(c.context_tokens), vectors, f"{stat.ppl:.3f}"]
        row += [f"{result.domains[d][c.name].ppl:.3f}" for d in domains]
        lines.append("| " + " | ".join(row) + " |")
    counts = ", ".join(
        f"{d} {result.domains[d][NO_CONTEXT].tokens:,} tokens / {result.domains[d][NO_CONTEXT].blocks} blocks"
        for d in domains
    )
    nc = result.overall[NO_CONTEXT]
    lines += [
        "",
        f"Targets: the last {result.plan.eval_segment - 1} tokens of each block, the same in every condition; "
        f"{nc.tokens:,} tokens in {nc.blocks} blocks ({counts}).",
    ]
    shares = gap_shares(result)
    if shares:
        best = next(iter(shares.values()))["vs"]
        parts = [f"{name}: {v['loss']:.1%} (ppl: {v['ppl']:.1%})" for name, v in shares.items()]
        lines.append(
            f"Share of the no-context -> {best} gap closed, on loss (log-ppl): " + "; ".join(parts) + "."
        )
        if result.overall[best].loss >= result.overall[NO_CONTEXT].loss:
            lines.append(
                f"Note: {best} is no better than no context here, so these shares are not meaningful."
            )
    for warning in result.plan.warnings:
        lines.append(f"Warning: {warning}.")
    return "\n".join(lines) + "\n"


def _label(cond) -> str:
    if cond.kind in (SUMMARY, SUMMARY_VARIABLE):
        return f"{line_label(cond)}, {len(cond.context_segments)} segment(s)"
    return LABELS[cond.kind]


def line_label(cond) -> str:
    """A condition's kind, and its stop threshold when it has its own."""
    if cond.stop_threshold is None:
        return LABELS[cond.kind]
    return f"{LABELS[cond.kind]}, stop threshold {cond.stop_threshold!r}"


def plot(result: EvalResult, path: str | Path, title: str | None = None) -> Path:
    """Perplexity vs context tokens: one line per condition kind (and stop threshold), each starting at the
    no-context point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nc = result.overall[NO_CONTEXT].ppl
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(nc, color="gray", linestyle="--", linewidth=1, label=LABELS[NO_CONTEXT])
    markers = {SUMMARY: "o", SUMMARY_VARIABLE: "s", FULL_ATTENTION: "^"}
    lines: dict[tuple, list] = {}
    for c in result.conditions:
        if c.kind in markers:
            lines.setdefault((c.kind, c.stop_threshold), []).append(c)
    for (kind, _), conds in lines.items():
        conds.sort(key=lambda c: c.context_tokens)
        xs = [0] + [c.context_tokens for c in conds]
        ys = [nc] + [result.overall[c.name].ppl for c in conds]
        ax.plot(xs, ys, marker=markers[kind], label=line_label(conds[0]))
        if kind != FULL_ATTENTION:
            for c in conds:
                vectors = result.overall[c.name].summary_vectors
                ax.annotate(
                    f"{vectors:.0f}",
                    (c.context_tokens, result.overall[c.name].ppl),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(0, 5),
                    ha="center",
                )
    ax.set_xlabel("context tokens before the evaluation segment")
    ax.set_ylabel(f"perplexity of the last {result.plan.eval_segment - 1} tokens")
    ax.set_title(title or "perplexity vs context (numbers: summary vectors)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
