"""Remote corpora over the S3 protocol, against a local authenticated server (tests/support/s3_server.py): upload,
fetching into a cache, reading, and the errors a user meets first. In-process; training end to end from
s3:// (SIGKILL and resume, two ranks, the launcher's error line) is tests/faults/test_fault_remote.py.

Every test gets the server's credentials and endpoint in the standard environment variables (monkeypatched),
as a user exports them.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch
from runs import tiny_corpus
from s3_server import BUCKET, free_port

from acomp.data import (
    CorpusDataset,
    CorruptShardError,
    RemoteError,
    build_corpus,
    build_dataloader,
    fetch_corpus,
    read_manifest,
    upload_corpus,
)
from acomp.data.__main__ import main
from acomp.data.remote import CACHE_MARK, S3Corpus
from acomp.train.data import DataError, open_corpus

# A refused or unreachable store must fail at once (a few quick retries), not after a retry storm or a
# connection timeout; generous for a loaded machine, far below either.
ERROR_WITHIN_S = 20


def quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def other(corpus, tmp_path_factory):
    """Another build with the same tokenizer (more documents held out): other shards, another manifest."""
    out = tmp_path_factory.mktemp("other") / "corpus"
    build_corpus(
        source="stdlib",
        out=out,
        tokenizer=str(corpus / "tokenizer"),
        block_size=128,
        limit_docs=80,
        val_fraction=0.4,
        progress=False,
    )
    return out


@pytest.fixture
def env(s3, monkeypatch):
    s3.apply(monkeypatch)
    return s3


@pytest.fixture(autouse=True)
def _release_shared_memory():
    yield
    gc.collect()


def blocks(ds) -> torch.Tensor:
    return torch.stack([ds[i]["input_ids"] for i in range(ds.num_samples)])


def local_blocks(corpus, split: str) -> torch.Tensor:
    ds = CorpusDataset(corpus, split, shuffle=False, batch_size=1)
    out = blocks(ds)
    del ds
    return out


def keys_under(s3, prefix: str) -> set[str]:
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for o in listing.get("Contents", [])}


def files(root) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_remote_corpus_reads_as_the_local_one_and_its_cache_is_reused(
    env, remote_tiny, corpus, tmp_path, monkeypatch
):
    from streaming.base.storage import S3Downloader

    cache = tmp_path / "cache"
    ds = CorpusDataset(remote_tiny, "val", local_cache=cache, shuffle=False, batch_size=1)
    assert torch.equal(blocks(ds), local_blocks(corpus, "val"))
    assert ds.manifest == read_manifest(corpus)
    del ds
    gc.collect()
    tokenizer = {f"tokenizer/{p.name}" for p in (corpus / "tokenizer").iterdir()}
    assert files(cache) == {CACHE_MARK, "manifest.json", "val/index.json", "val/shard.00000.mds"} | tokenizer
    shard = (cache / "val" / "shard.00000.mds").stat()

    def no_download(*args):
        raise AssertionError(f"downloaded again: {args}")

    monkeypatch.setattr(S3Downloader, "_download_file_impl", no_download)
    ds = CorpusDataset(remote_tiny, "val", local_cache=cache, shuffle=False, batch_size=1)
    assert torch.equal(blocks(ds), local_blocks(corpus, "val"))
    again = (cache / "val" / "shard.00000.mds").stat()
    assert (again.st_ino, again.st_mtime_ns) == (shard.st_ino, shard.st_mtime_ns)


def test_open_corpus_fetches_the_manifest_and_tokenizer(env, remote_tiny, corpus, tmp_path):
    from acomp.data.tokenizer import tokenizer_sha256

    remote, local = open_corpus(remote_tiny, tmp_path / "cache"), open_corpus(corpus)
    assert (remote.uri, remote.source, remote.path) == (remote_tiny, remote_tiny, tmp_path / "cache")
    assert remote.manifest == local.manifest
    assert (
        tokenizer_sha256(remote.tokenizer)
        == tokenizer_sha256(local.tokenizer)
        == local.manifest["tokenizer"]["sha256"]
    )


CLOSED_PORT = free_port()  # nothing listens there: connections are refused
ERRORS = {
    "wrong_secret": (
        {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        "tiny",
        "s3://corpora/tiny/manifest.json: access denied by http://127.0.0.1:{port} (SignatureDoesNotMatch: ",
    ),
    "unknown_key": (
        {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"},
        "tiny",
        "s3://corpora/tiny/manifest.json: access denied by http://127.0.0.1:{port} (InvalidAccessKeyId: ",
    ),
    "missing_bucket": (
        {},
        None,
        "s3://no-such-bucket/tiny/manifest.json: bucket 'no-such-bucket' does not exist",
    ),
    "missing_corpus": (
        {},
        "nothing-here",
        "no corpus at s3://corpora/nothing-here: s3://corpora/nothing-here/manifest.json does not exist",
    ),
    "unreachable_endpoint": (
        {"S3_ENDPOINT_URL": f"http://127.0.0.1:{CLOSED_PORT}"},
        "tiny",
        f"s3://corpora/tiny/manifest.json: cannot reach the object store at http://127.0.0.1:{CLOSED_PORT} after 3 "
        "attempts",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_store_errors_are_one_line_within_seconds(case, s3, remote_tiny, tmp_path, monkeypatch):
    """What a user meets first: each is one DataError line (the launcher prints it, exit 2) naming the URI and
    the cause, raised within seconds; the cache is left empty."""
    overrides, prefix, text = ERRORS[case]
    s3.apply(monkeypatch, **overrides)
    uri = f"s3://{BUCKET}/{prefix}" if prefix else "s3://no-such-bucket/tiny"
    started = time.monotonic()
    with pytest.raises(DataError) as raised:
        open_corpus(uri, tmp_path / "cache")
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"data.path={uri!r}: "), message
    assert text.format(port=s3.endpoint.rsplit(":", 1)[1]) in message, message
    assert elapsed < ERROR_WITHIN_S, f"{elapsed:.1f} s: {message}"
    assert not (tmp_path / "cache").exists()


def test_an_interrupted_upload_is_no_corpus_and_the_manifest_goes_last(env, corpus, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/interrupted"
    put, order = S3Corpus.put, []

    def failing_put(self, name, path):
        order.append(name)
        if len(order) == 4:
            raise RemoteError("connection lost (simulated)")
        put(self, name, path)

    monkeypatch.setattr(S3Corpus, "put", failing_put)
    with pytest.raises(RemoteError, match="simulated"):
        upload_corpus(corpus, uri, log=quiet)
    assert len(keys_under(env, "interrupted/")) == 3
    with pytest.raises(RemoteError, match=f"no corpus at {uri}: {uri}/manifest.json does not exist"):
        fetch_corpus(uri, tmp_path / "cache")

    def recording_put(self, name, path):
        order.append(name)
        put(self, name, path)

    order.clear()
    monkeypatch.setattr(S3Corpus, "put", recording_put)
    assert upload_corpus(corpus, uri, log=quiet) == len(order) == len(files(corpus))
    assert order[-1] == "manifest.json"
    for split in ("train", "val"):
        shards = [i for i, name in enumerate(order) if name.startswith(f"{split}/shard.")]
        assert shards and max(shards) < order.index(f"{split}/index.json")
    assert keys_under(env, "interrupted/") == {f"interrupted/{f}" for f in files(corpus)}
    assert fetch_corpus(uri, tmp_path / "cache") == read_manifest(corpus)
    order.clear()
    assert upload_corpus(corpus, uri, log=quiet) == 0 and order == []  # already there: nothing uploaded


def test_uploading_over_another_corpus(env, corpus, other, tmp_path, monkeypatch, capsys):
    """Refused without --overwrite (CLI: exit 2, one line); an overwrite removes the old manifest first, so an
    interrupted one leaves no corpus rather than the old manifest over new files; a cache of the old corpus
    is cleared and refilled from the new one."""
    uri = f"s3://{BUCKET}/replaced"
    upload_corpus(corpus, uri, log=quiet)
    cache = tmp_path / "cache"
    ds = CorpusDataset(uri, "val", local_cache=cache, shuffle=False, batch_size=1)
    assert torch.equal(blocks(ds), local_blocks(corpus, "val"))
    del ds
    gc.collect()

    assert (
        main(["upload", str(other), uri]) == 2
    )  # the command, in-process (the session fixture ran it for real)
    theirs, ours = read_manifest(corpus)["fingerprint"], read_manifest(other)["fingerprint"]
    assert capsys.readouterr().err.splitlines() == [
        f"error: {uri} already holds another corpus (fingerprint {theirs}, this one {ours}); pass --overwrite to "
        f"replace it"
    ]

    put = S3Corpus.put

    def failing_put(self, name, path):
        raise RemoteError("connection lost (simulated)")

    monkeypatch.setattr(S3Corpus, "put", failing_put)
    with pytest.raises(RemoteError, match="simulated"):
        upload_corpus(other, uri, overwrite=True, log=quiet)
    with pytest.raises(RemoteError, match=f"no corpus at {uri}"):
        fetch_corpus(uri, cache)
    monkeypatch.setattr(S3Corpus, "put", put)
    upload_corpus(other, uri, overwrite=True, log=quiet)

    ds = CorpusDataset(uri, "val", local_cache=cache, shuffle=False, batch_size=1)
    assert ds.manifest == read_manifest(other)
    assert torch.equal(blocks(ds), local_blocks(other, "val"))
    del ds
    gc.collect()
    assert "train/index.json" not in files(cache)  # the old build's index and shards went with its manifest


def test_a_directory_that_is_not_a_cache_is_never_cleared(env, remote_tiny, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(
        RemoteError, match=f"the corpus cache directory {home} is not empty and is not a corpus cache"
    ):
        fetch_corpus(remote_tiny, home)
    assert files(home) == {"notes.txt"}


def test_a_corrupted_remote_shard_is_named(env, corpus, tmp_path):
    """Same size, 64 bytes zeroed: caught when the downloaded shard is first read, naming both copies."""
    uri = f"s3://{BUCKET}/corrupted"
    upload_corpus(corpus, uri, log=quiet)
    data = bytearray((corpus / "train" / "shard.00000.mds").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    env.client().put_object(Bucket=BUCKET, Key="corrupted/train/shard.00000.mds", Body=bytes(data))
    cache = tmp_path / "cache"
    ds = CorpusDataset(uri, "train", local_cache=cache, batch_size=2)
    with pytest.raises(CorruptShardError) as raised:
        next(iter(build_dataloader(ds, 2)))
    assert str(raised.value) == (
        f"shard {cache}/train/shard.00000.mds fails its xxh64 checksum: the copy downloaded from "
        f"{uri}/train/shard.00000.mds is corrupted (remote or in transit); delete the cached file and rerun, or "
        f"rebuild and re-upload the corpus"
    )
    del ds


def test_a_cache_in_use_is_refused_with_one_line(env, remote_tiny, tmp_path):
    """Streaming allows one live dataset per cache directory on a machine: a second job gets one line."""
    from acomp.config import config_from_dict
    from acomp.train.data import train_loader

    cache = tmp_path / "cache"
    cfg = config_from_dict(
        {"model": {"arch": {"hidden_size": 64}}, "data": {"path": remote_tiny, "cache_dir": str(cache)}}
    )
    corpus = open_corpus(remote_tiny, cache)
    first = train_loader(cfg, corpus, 2)
    with pytest.raises(DataError) as raised:
        train_loader(cfg, corpus, 2)
    assert str(raised.value) == (
        f"data.path={remote_tiny!r}: its cache {cache} is in use by another job on this machine (streaming allows "
        f"one live dataset per cache directory); give this run another data.cache_dir"
    )
    del first


def test_the_endpoint_may_come_from_aws_endpoint_url(s3, remote_tiny, corpus, tmp_path, monkeypatch):
    """boto3's own variable works as well as streaming's S3_ENDPOINT_URL, for the manifest and the shards."""
    s3.apply(monkeypatch)
    monkeypatch.delenv("S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    ds = CorpusDataset(remote_tiny, "val", local_cache=tmp_path / "cache", shuffle=False, batch_size=1)
    assert torch.equal(blocks(ds), local_blocks(corpus, "val"))
    del ds


def test_build_corpus_with_an_s3_out_builds_then_uploads(env, corpus, tmp_path, capsys):
    """`preprocess/build_corpus.py --out s3://...`: one command; the local build is kept in --stage, so a rerun
    is up to date and uploads nothing."""
    from runs import load_script

    cli = load_script("preprocess/build_corpus.py", "build_corpus_cli")
    uri, stage = f"s3://{BUCKET}/built", tmp_path / "stage"
    args = ["--source", "stdlib", "--tokenizer", str(corpus / "tokenizer"), "--block-size", "128"]
    args += ["--limit-docs", "20", "--num-workers", "1", "--out", uri, "--stage", str(stage), "--quiet"]
    assert cli.main(args) == 0
    assert fetch_corpus(uri, tmp_path / "cache") == read_manifest(stage)
    assert keys_under(env, "built/") == {f"built/{f}" for f in files(stage)}
    capsys.readouterr()
    assert cli.main(args[:-1]) == 0  # not --quiet: the upload reports what it did
    assert (
        f"{uri} already holds this corpus (the same manifest.json): nothing to upload"
        in capsys.readouterr().out
    )
