"""Disk full while checkpointing: one clear error, the previous checkpoint intact and chosen for resuming.

No root needed: the test imposes a write quota on the running trainer (RLIMIT_FSIZE through prlimit(2)), so
writing a checkpoint file past 256 KiB fails with EFBIG ("File too large") as it would with ENOSPC on a full
disk; the small files (metrics.jsonl, the first KiB of each checkpoint) still get written.
"""

from __future__ import annotations

import re
import resource

import pytest
import torch
from fault_helpers import (
    assert_checkpoints_complete,
    assert_no_traceback,
    error_lines,
    finish,
    latest,
    reference_config,
    start,
    tails,
    wait_until,
)
from runs import write_config

from acomp.train.checkpoint import Checkpointer
from acomp.train.distributed import Dist

pytestmark = pytest.mark.slow

QUOTA = 256 * 1024  # the optimizer state of the tiny model is ~1.7 MB


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(corpus, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out))
    ranks = start(config, ["train.max_steps=100000"], tmp_path / "logs")
    wait_until(lambda: latest(out) is not None, ranks, 240, "the first checkpoint")
    resource.prlimit(ranks[0].proc.pid, resource.RLIMIT_FSIZE, (QUOTA, QUOTA))
    codes, _ = finish(ranks, 120)
    assert codes == [1], tails(ranks)
    text = ranks[0].output()
    assert_no_traceback(text)
    lines = error_lines(text)
    assert len(lines) == 1, text[-3000:]
    pattern = (
        r"could not write checkpoint (step_\d{8}) .*file size limit 262144 bytes.* checkpoint (\S+) is intact"
    )
    found = re.search(pattern, lines[0])
    assert found, lines[0]
    failed, kept = found.group(1), found.group(2)
    assert kept.endswith(latest(out)) and latest(out) < failed  # the pointer still names the intact one
    assert_checkpoints_complete(out)
    dist = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert str(Checkpointer(out / "checkpoints", 2, dist).resolve("auto")) == kept
