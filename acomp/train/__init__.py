"""Training: the loop (`run`), its pieces, and the evaluation used by the demo.

`run(load_config("configs/tiny.yaml", ["train.max_steps=20"]))` trains and returns the output directory;
`heldout_ppl_of_export(out / "final", "data/stdlib", [128, 128, 128, 128])` then compares held-out
perplexity of the last segment with no context and with summary vectors (docs/TRAINING.md).
"""

from acomp.train.heldout import heldout_ppl, heldout_ppl_of_export
from acomp.train.loop import Preempted, run, train_substep, truncate_bptt
from acomp.train.preemption import EXIT_REQUEUE
from acomp.train.segments import random_segment_lengths, segment_position_budget, split_substeps

__all__ = [
    "EXIT_REQUEUE",
    "Preempted",
    "heldout_ppl",
    "heldout_ppl_of_export",
    "random_segment_lengths",
    "run",
    "segment_position_budget",
    "split_substeps",
    "train_substep",
    "truncate_bptt",
]
