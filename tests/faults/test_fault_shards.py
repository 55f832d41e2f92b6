"""Silent shard corruption is caught with the default config: a same-size shard with 64 bytes zeroed (its
sizes match index.json and its decoded ids stay inside the vocabulary) stops the run at its first read, with
exit 2 and one line naming the shard, because each shard's xxh64 is checked when a process first reads it."""

from __future__ import annotations

import shutil

import pytest
from fault_helpers import assert_no_traceback, error_lines, metric_steps, reference_config
from runs import launch, write_config

from acomp.data import verify_shards

pytestmark = pytest.mark.slow


def test_same_size_corruption_stops_the_default_run_naming_the_shard(corpus, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    shard = copy / "train" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    verify_shards(copy / "train", "size")  # the cheap up-front check cannot see it

    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(copy, out))  # data.verify: the default
    proc = launch(config, expect_rc=2, timeout=240)
    output = proc.stdout + proc.stderr
    assert_no_traceback(output)
    assert error_lines(output) == [
        f"data error: shard {shard} fails its xxh64 checksum: corrupted; rebuild the corpus"
    ]
    assert metric_steps(out) == 0  # stopped at the first read, before the first step was logged
