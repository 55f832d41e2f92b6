"""The paper's language-modelling protocol: perplexity of a block's final segment under each
kind of context, all conditions scoring exactly the same target tokens.

For a block of L tokens and an evaluation segment of E tokens, the targets are the block's last E - 1
tokens (positions L-E+1 .. L-1): every position of the final segment predicts the next token inside it.
The segment's first token is not a target, because under "no context" nothing precedes it. Conditions:

- ``no_context``: the final segment alone;
- ``summary`` with k segments: the k segments of S tokens before it are compressed (one `compress_context`
  call, accumulating summaries), and the final segment is scored behind those summary vectors; in the
  variable-length mode ``summary`` spends every slot of each segment and ``summary_variable`` stops
  where the model says (its stop rule and threshold), so the vector count is measured, not fixed; with
  `stop_thresholds` the ``summary_variable`` conditions again at each of those thresholds (named
  ``summary_variable_k_t0.3``, the threshold as Python prints it): one model's perplexity at several mean
  lengths;
- ``full_attention`` with c context tokens: the last c + E tokens as one plain segment (no summary tokens),
  with c up to the model's window minus E (the FA baseline of the paper).

Sums are kept per block, gathered from every rank and added with `math.fsum`, so a result does not depend
on the number of ranks or the order in which blocks were scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field

import torch

from acomp.modeling.compressor import IGNORE_INDEX
from acomp.modeling.config import STOP_RULES
from acomp.progress import Progress

NO_CONTEXT, SUMMARY, SUMMARY_VARIABLE, FULL_ATTENTION = (
    "no_context",
    "summary",
    "summary_variable",
    "full_attention",
)
KINDS = (NO_CONTEXT, SUMMARY, SUMMARY_VARIABLE, FULL_ATTENTION)


@dataclass(frozen=True)
class Condition:
    """One way of giving the model the context before the evaluation segment."""

    kind: str
    context_tokens: int = 0
    context_segments: tuple[int, ...] = ()  # summary kinds: the compressed segments, oldest first
    stop_threshold: float | None = None  # summary_variable only: this threshold instead of the run's

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown condition kind {self.kind!r}; expected one of {KINDS}")
        if self.stop_threshold is not None and self.kind != SUMMARY_VARIABLE:
            raise ValueError(f"a stop threshold applies to {SUMMARY_VARIABLE} conditions, not {self.kind!r}")
        if self.kind in (SUMMARY, SUMMARY_VARIABLE) and sum(self.context_segments) != self.context_tokens:
            raise ValueError(
                f"context_segments {list(self.context_segments)} do not sum to context_tokens {self.context_tokens}"
            )

    @property
    def name(self) -> str:
        if self.kind == NO_CONTEXT:
            return NO_CONTEXT
        if self.kind == FULL_ATTENTION:
            return f"{FULL_ATTENTION}_{self.context_tokens}"
        name = f"{self.kind}_{len(self.context_segments)}"
        return name if self.stop_threshold is None else f"{name}_t{self.stop_threshold!r}"


@dataclass
class ProtocolConfig:
    """What to evaluate; `plan_conditions` turns it into conditions for a given model and block size."""

    eval_segment: int = 2048  # E: tokens of the final segment (E - 1 targets per block)
    segment_length: int = 2048  # S: tokens per compressed context segment
    # Summary conditions for k = 1..this many compressed segments; None = as many as a block holds.
    max_context_segments: int | None = None
    # Tokens full attention may see (context + E); None = the config's max_position_embeddings; 0 = no FA.
    fa_window: int | None = None
    variable: bool | None = None  # variable-length conditions: None = when the model is in variable mode
    stop_threshold: float | None = None  # variable mode: overrides the model's compress_stop_threshold
    # Variable mode: overrides the model's compress_stop_rule (step | cumulative).
    stop_rule: str | None = None
    # Variable mode: the summary_variable conditions again at each of these stop thresholds.
    stop_thresholds: tuple[float, ...] = ()
    batch_size: int = 1  # blocks per forward
    max_blocks: int | None = None  # blocks evaluated, spread evenly over the split; None = all

    def check(self) -> None:
        for name in ("eval_segment", "segment_length", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.eval_segment < 2:
            raise ValueError(
                f"eval_segment must be >= 2 (it holds eval_segment - 1 targets), got {self.eval_segment}"
            )
        if self.max_context_segments is not None and self.max_context_segments < 0:
            raise ValueError(f"max_context_segments must be >= 0, got {self.max_context_segments}")
        if self.fa_window is not None and self.fa_window < 0:
            raise ValueError(f"fa_window must be >= 0, got {self.fa_window}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {self.max_blocks}")
        if self.stop_threshold is not None and not 0.0 <= self.stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1], got {self.stop_threshold}")
        for value in self.stop_thresholds:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"stop_thresholds must be in [0, 1], got {value}")
        if self.stop_rule is not None and self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {STOP_RULES}, got {self.stop_rule!r}")


@dataclass
class ConditionPlan:
    """The conditions to run, what they need from a block, and what the planner had to warn about."""

    conditions: list[Condition]
    eval_segment: int
    summary_per_segment: int  # fixed summary vectors per compressed segment (variable: the slot count)
    fa_window: int
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_needed(self) -> int:
        return self.eval_segment + max(c.context_tokens for c in self.conditions)


def is_variable(model) -> bool:
    return getattr(model.config, "compression_mode", "fixed") == "variable"


def summary_slots(model) -> int:
    """Summary vectors one compressed segment can carry (0: the model does not compress)."""
    config = model.config
    if is_variable(model):
        return int(config.compression_max_len)
    return int(getattr(config, "summary_length", 0) or 0)


def plan_conditions(model, cfg: ProtocolConfig, block_size: int) -> ConditionPlan:
    """The conditions for `model` on blocks of `block_size` tokens, or a ValueError naming the bad value."""
    cfg.check()
    config = model.config
    E, S = cfg.eval_segment, cfg.segment_length
    if E > block_size:
        raise ValueError(f"eval_segment={E} is longer than the blocks ({block_size} tokens)")
    fits = (block_size - E) // S
    k_max = fits if cfg.max_context_segments is None else cfg.max_context_segments
    if k_max > fits:
        raise ValueError(
            f"max_context_segments={k_max} needs {k_max} x segment_length={S} + eval_segment={E} = "
            f"{k_max * S + E} tokens per block, but the blocks have {block_size}"
        )
    slots = summary_slots(model)
    variable = is_variable(model) if cfg.variable is None else cfg.variable
    if variable and not is_variable(model):
        raise ValueError(
            "variable-length conditions need a model with compression_mode 'variable'; this one has "
            f"compression_mode {getattr(config, 'compression_mode', 'fixed')!r}"
        )
    warnings: list[str] = []
    conditions = [Condition(NO_CONTEXT)]
    k_summary = k_max  # summary conditions; full attention keeps every k x S that fits (below)
    if slots == 0 and k_max:
        warnings.append("the model has summary_length 0 (no compression): summary conditions skipped")
        k_summary = 0
    for k in range(1, k_summary + 1):
        conditions.append(Condition(SUMMARY, k * S, (S,) * k))
    if variable:
        for threshold in (None, *dict.fromkeys(float(t) for t in cfg.stop_thresholds)):
            conditions += [
                Condition(SUMMARY_VARIABLE, k * S, (S,) * k, threshold) for k in range(1, k_summary + 1)
            ]
    elif cfg.stop_thresholds:
        warnings.append(
            "stop_thresholds skipped: no variable-length conditions (a fixed-length model or variable=False)"
        )
    max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
    window = max_pos if cfg.fa_window is None else cfg.fa_window
    _check_lengths(model, E, S, window, max_pos, warnings)
    fa_contexts = sorted(
        {k * S for k in range(1, k_max + 1) if k * S + E <= window}
        | ({min(window, block_size) - E} if min(window, block_size) > E else set())
    )
    if cfg.fa_window != 0 and not fa_contexts:
        warnings.append(
            f"full attention skipped: its window ({window} tokens) leaves no context before the "
            f"{E}-token evaluation segment"
        )
    conditions += [Condition(FULL_ATTENTION, c) for c in fa_contexts]
    _check_positions(model, conditions, E, S, slots, max_pos, warnings)
    return ConditionPlan(conditions, E, slots, window, warnings)


def _check_lengths(model, E, S, window, max_pos, warnings) -> None:
    """The evaluation segment, a compressed segment's text and the full-attention window against the model's
    positions: past them a learned position table (OPT) has no embedding (a ValueError naming the value,
    before any scoring), a RoPE model runs on positions it may never have trained on (a warning)."""
    rule = getattr(model, "position_rule", None)
    if not max_pos or rule is None:
        return
    for name, value in (("eval_segment", E), ("segment_length", S), ("fa_window", window)):
        if value <= max_pos:
            continue
        message = f"{name}={value} is longer than the model's max_position_embeddings={max_pos}"
        if rule.learned_table:
            raise ValueError(message + " (a learned position table)")
        if name != "segment_length":  # the summary conditions' own check covers compressed segments
            warnings.append(message + ": positions it may never have trained on")


def _check_positions(model, conditions, E, S, slots, max_pos, warnings) -> None:
    """RoPE families number softprompt, text and summary tokens consecutively: warn when a summary
    condition reaches positions the model may never have trained on (its results are then suspect)."""
    rule = getattr(model, "position_rule", None)
    if not max_pos or rule is None or not rule.softprompt_consumes_positions:
        return
    per_segment = slots + (1 if is_variable(model) else 0)  # variable mode adds the <sum> trigger
    for cond in conditions:
        if cond.kind in (SUMMARY, SUMMARY_VARIABLE):
            # the last compressed segment sees (k-1) segments' summaries, its text and its own summary tokens;
            # the evaluation segment sees k segments' summaries and its text
            k = len(cond.context_segments)
            need = (k - 1) * slots + max(S + per_segment, slots + E)
            if need > max_pos:
                warnings.append(
                    f"{cond.name}: up to {need} positions (softprompt + segment + summary tokens) exceed "
                    f"max_position_embeddings={max_pos}"
                )


# ------------------------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    """Per-block results of one condition on a batch: summed NLL, target count, summary vectors used."""

    nll: list[float]
    tokens: list[int]
    vectors: list[float]


@contextmanager
def eval_mode(model):
    """The model in eval mode within the block, then back in the mode it came in (train or eval)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def config_value(model, key: str, value):
    """Temporarily set one of the model config's inference fields (None leaves the model's own)."""
    if value is None:
        yield
        return
    old = getattr(model.config, key)
    setattr(model.config, key, value)
    try:
        yield
    finally:
        setattr(model.config, key, old)


@torch.no_grad()
def condition_output(
    model,
    ids: torch.Tensor,
    cond: Condition,
    eval_segment: int,
    threshold: float | None = None,
    return_logits: bool = False,
):
    """The model's output on blocks `ids` [B, L] whose last `eval_segment` tokens are read under `cond` (the
    targets labelled: only those inside the final segment), and the summary vectors each block used [B]."""
    E = eval_segment
    target = ids[:, -E:]
    vectors = [0.0] * ids.shape[0]
    if cond.kind == FULL_ATTENTION:
        span = ids[:, ids.shape[1] - cond.context_tokens - E :]
        labels = span.clone()
        labels[:, : cond.context_tokens + 1] = IGNORE_INDEX  # only targets inside the final segment count
        return model(span, labels=labels, return_logits=return_logits), vectors
    if cond.kind == NO_CONTEXT or not cond.context_segments:
        return model(target, labels=target, return_logits=return_logits), vectors
    context = ids[:, ids.shape[1] - cond.context_tokens - E : ids.shape[1] - E]
    # A variable-mode model spends every slot in the fixed condition (threshold 1 never fires).
    if cond.kind == SUMMARY and is_variable(model):
        forced = 1.0
    else:
        forced = threshold if cond.stop_threshold is None else cond.stop_threshold
    with config_value(model, "compress_stop_threshold", forced):
        memory = model.compress_context(context, segment_lengths=list(cond.context_segments))
    # Only the vectors the model kept (the same NLL as the masked full width, less work).
    out = model(target, labels=target, softprompt=memory.summary.compact(), return_logits=return_logits)
    if memory.summary_lengths is not None:
        vectors = memory.summary_lengths.sum(dim=1).double().tolist()
    else:
        vectors = [float(memory.softprompt.shape[1])] * ids.shape[0]
    return out, vectors


def score(
    model, ids: torch.Tensor, cond: Condition, eval_segment: int, threshold: float | None = None
) -> Scores:
    """Score the last `eval_segment` tokens of blocks `ids` [B, L] under one condition."""
    E = eval_segment
    out, vectors = condition_output(model, ids, cond, E, threshold)
    nll = out.segment_nll[:, -1].double().tolist()
    tokens = out.segment_tokens[:, -1].tolist()
    if any(t != E - 1 for t in tokens):
        raise RuntimeError(f"{cond.name} scored {tokens} targets per block, expected {E - 1} each")
    return Scores(nll, [int(t) for t in tokens], vectors)


# -------------------------------------------------------------------------------------------- running
@dataclass
class Stat:
    """Aggregate of one condition over a set of blocks."""

    nll_sum: float
    tokens: int
    blocks: int
    summary_vectors: float  # mean per block

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "ppl": self.ppl}


@dataclass
class EvalResult:
    plan: ConditionPlan
    config: ProtocolConfig
    overall: dict[str, Stat]  # condition name -> Stat
    domains: dict[str, dict[str, Stat]]  # domain -> condition name -> Stat
    blocks: int
    blocks_selected: int
    seconds: float
    world_size: int
    records: list[dict] = field(default_factory=list)  # per block, in index order

    @property
    def conditions(self) -> list[Condition]:
        return self.plan.conditions

    def condition(self, name: str) -> Condition:
        for cond in self.plan.conditions:
            if cond.name == name:
                return cond
        raise KeyError(f"no condition {name!r}; have {[c.name for c in self.plan.conditions]}")


def select_blocks(total: int, max_blocks: int | None) -> list[int]:
    """Indices of the blocks to evaluate: all, or `max_blocks` spread evenly over the split (so every
    part of an ordered split, hence every domain, is represented)."""
    if total <= 0:
        raise ValueError("the split has no blocks")
    if max_blocks is None or max_blocks >= total:
        return list(range(total))
    return [i * total // max_blocks for i in range(max_blocks)]


def _item(blocks, index: int) -> tuple[torch.Tensor, str]:
    item = blocks[index]
    if isinstance(item, dict):
        return torch.as_tensor(item["input_ids"]), str(item.get("domain", "all"))
    return torch.as_tensor(item), "all"


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate(
    model,
    blocks: Sequence,
    cfg: ProtocolConfig,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    deadline: float | None = None,
    keep_records: bool = False,
) -> EvalResult:
    """Run every condition on the selected blocks of `blocks` (a sequence of dicts with "input_ids" and
    "domain", or of token tensors). Under torch.distributed rank r scores blocks r, r + world, ... and the
    per-block results are gathered on every rank. `deadline` (time.monotonic()) stops early, after a batch:
    the result then covers fewer blocks, still the same ones in every condition."""
    rank, world = _rank_world()
    started = time.monotonic()
    first, _ = _item(blocks, 0)
    plan = plan_conditions(model, cfg, int(first.shape[-1]))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chosen = select_blocks(len(blocks), cfg.max_blocks)
    mine = chosen[rank::world]
    records: list[dict] = []
    desc = "eval blocks" if world == 1 else f"eval blocks (rank 0 of {world})"
    bar = Progress(len(mine), desc, "block", enabled=progress and rank == 0)
    with eval_mode(model), config_value(model, "compress_stop_rule", cfg.stop_rule), closing(bar):
        for start in range(0, len(mine), cfg.batch_size):
            if deadline is not None and time.monotonic() > deadline:
                break
            indices = mine[start : start + cfg.batch_size]
            items = [_item(blocks, i) for i in indices]
            ids = torch.stack([ids[-plan.tokens_needed :] for ids, _ in items]).to(device)
            batch = [
                {"index": i, "domain": d, "nll": {}, "tokens": {}, "vectors": {}}
                for i, (_, d) in zip(indices, items)
            ]
            for cond in plan.conditions:
                s = score(model, ids, cond, plan.eval_segment, cfg.stop_threshold)
                for rec, nll, tok, vec in zip(batch, s.nll, s.tokens, s.vectors):
                    rec["nll"][cond.name], rec["tokens"][cond.name], rec["vectors"][cond.name] = nll, tok, vec
            records += batch
            bar.update(len(indices))
    records = sorted(gather_records(records), key=lambda r: r["index"])
    if not records:
        raise ValueError("no block was evaluated (deadline too short?)")
    overall, domains = aggregate(records, plan.conditions)
    return EvalResult(
        plan=plan,
        config=cfg,
        overall=overall,
        domains=domains,
        blocks=len(records),
        blocks_selected=len(chosen),
        seconds=time.monotonic() - started,
        world_size=world,
        records=records if keep_records else [],
    )


def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's per-block records, on every rank (one all_gather_object; plain list alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(records)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def aggregate(records: list[dict], conditions: list[Condition]) -> tuple[dict, dict]:
    """Overall and per-domain Stats. NLL sums use math.fsum: exact, so independent of the summation order."""

    def stat(rows, name) -> Stat:
        return Stat(
            nll_sum=math.fsum(r["nll"][name] for r in rows),
            tokens=sum(int(r["tokens"][name]) for r in rows),
            blocks=len(rows),
            summary_vectors=math.fsum(r["vectors"][name] for r in rows) / max(len(rows), 1),
        )

    by_domain: dict[str, list[dict]] = {}
    for r in records:
        by_domain.setdefault(r["domain"], []).append(r)
    overall = {c.name: stat(records, c.name) for c in conditions}
    domains = {d: {c.name: stat(rows, c.name) for c in conditions} for d, rows in sorted(by_domain.items())}
    return overall, domains


def gap_share(result: EvalResult, summary: str, full_attention: str, on: str = "loss") -> float:
    """Share of the no-context -> full-attention gap that a summary condition closes:
    (x_nc - x_summary) / (x_nc - x_fa), with x the mean loss (log-perplexity, `on="loss"`) or the ppl."""
    if on not in ("loss", "ppl"):
        raise ValueError(f"on must be 'loss' or 'ppl', got {on!r}")
    value = {name: getattr(result.overall[name], on) for name in (NO_CONTEXT, summary, full_attention)}
    gap = value[NO_CONTEXT] - value[full_attention]
    return (value[NO_CONTEXT] - value[summary]) / gap if gap else math.nan
