"""Evaluation: the paper's perplexity protocol (no context / summary vectors / full attention) and its reports.

`evaluate(model, CorpusBlocks(path, "val"), ProtocolConfig(...))` -> EvalResult; `report.write_json`,
`report.markdown`, `report.plot` write it out. The CLI is launchers/eval.py (docs/EVALUATION.md).
"""

from acomp.eval.corpus_blocks import CorpusBlocks
from acomp.eval.protocol import (
    FULL_ATTENTION,
    NO_CONTEXT,
    SUMMARY,
    SUMMARY_VARIABLE,
    Condition,
    ConditionPlan,
    EvalResult,
    ProtocolConfig,
    Stat,
    evaluate,
    gap_share,
    plan_conditions,
    score,
    select_blocks,
)

__all__ = [
    "FULL_ATTENTION",
    "NO_CONTEXT",
    "SUMMARY",
    "SUMMARY_VARIABLE",
    "Condition",
    "ConditionPlan",
    "CorpusBlocks",
    "EvalResult",
    "ProtocolConfig",
    "Stat",
    "evaluate",
    "gap_share",
    "plan_conditions",
    "score",
    "select_blocks",
]
