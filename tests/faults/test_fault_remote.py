"""Training from a corpus in an S3-compatible store (tests/support/s3_server.py: moto on 127.0.0.1, authenticated),
through the real launcher: a SIGKILLed run resumes from its checkpoint and reproduces the uninterrupted local
run bitwise, reading its shards from the cache (the remote shards are deleted before it resumes); two ranks
share one remote corpus and one cache; refused credentials stop the run with one line, exit 2."""

from __future__ import annotations

import pytest
from fault_helpers import (
    REFERENCE_STEPS,
    assert_no_traceback,
    error_lines,
    finish,
    latest,
    metric_steps,
    records,
    reference_config,
    start,
    wait_until,
)
from runs import launch, losses, write_config
from s3_server import BUCKET

from acomp.data import upload_corpus
from acomp.data.remote import CACHE_MARK
from acomp.train import faults

pytestmark = pytest.mark.slow


def cached_files(cache) -> set[str]:
    return {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}


def test_sigkill_and_resume_from_s3_reproduce_the_local_run(s3, corpus, reference, tmp_path, monkeypatch):
    s3.apply(monkeypatch)
    uri = f"s3://{BUCKET}/resume"  # its own copy: its shards are deleted below
    upload_corpus(corpus, uri, log=lambda line: None)
    out, cache = tmp_path / "run", tmp_path / "cache"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out))
    overrides = [f"data.path={uri}", f"data.cache_dir={cache}"]

    ranks = start(config, overrides, tmp_path / "logs1", env={faults.STEP_SLEEP: "0.2"})  # killed mid-run
    wait_until(lambda: latest(out) is not None and metric_steps(out) >= 3, ranks, 240, "a checkpoint")
    ranks[0].proc.kill()
    finish(ranks, 30)
    assert metric_steps(out) < REFERENCE_STEPS
    shard = cache / "train" / "shard.00000.mds"
    before = shard.stat()

    client = s3.client()
    shards = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="resume/")["Contents"]]
    shards = [key for key in shards if "/shard." in key]
    assert len(shards) == 2
    for key in shards:  # the resumed run must not need them: it reads the cached copies
        client.delete_object(Bucket=BUCKET, Key=key)

    proc = launch(config, overrides)
    assert f"resumed from {out / 'checkpoints'}" in proc.stdout
    assert [r["step"] for r in records(out)] == list(range(1, REFERENCE_STEPS + 1))
    assert losses(out) == reference
    after = shard.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_two_ranks_share_one_remote_corpus_and_cache(
    s3, remote_tiny, corpus, reference, tmp_path, monkeypatch
):
    s3.apply(monkeypatch)
    out, cache = tmp_path / "run", tmp_path / "cache"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out, micro_batch_size=1))
    launch(config, [f"data.path={remote_tiny}", f"data.cache_dir={cache}", "train.max_steps=4"], nproc=2)
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:  # 2-rank ZeRO-3 vs the 1-rank reference: only the reduction order differs
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got, reference)
    tokenizer = {f"tokenizer/{p.name}" for p in (corpus / "tokenizer").iterdir()}
    assert (
        cached_files(cache)
        == {CACHE_MARK, "manifest.json", "train/index.json", "train/shard.00000.mds"} | tokenizer
    )


def test_refused_credentials_stop_the_run_with_one_line(s3, remote_tiny, corpus, tmp_path, monkeypatch):
    s3.apply(monkeypatch, AWS_SECRET_ACCESS_KEY="not-the-secret")
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", reference_config(corpus, out))
    proc = launch(config, [f"data.path={remote_tiny}", f"data.cache_dir={tmp_path / 'cache'}"], expect_rc=2)
    output = proc.stdout + proc.stderr
    assert_no_traceback(output)
    lines = error_lines(output)
    assert len(lines) == 1, output[-3000:]
    assert lines[0].startswith(
        f"data error: data.path={remote_tiny!r}: {remote_tiny}/manifest.json: access denied by {s3.endpoint} "
        f"(SignatureDoesNotMatch: "
    ), lines[0]
    assert metric_steps(out) == 0
