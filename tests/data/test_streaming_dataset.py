"""Reading a corpus at training time: samples, shuffling, ranks, workers, resumption, manifest and shard checks.

Streaming keeps per-dataset state in shared memory under a prefix registered per local directory. Local
corpora can be opened any number of times in one process (each dataset takes a fresh prefix); a remote
corpus needs a distinct ``local_cache`` per live dataset, hence ``tmp_path`` caches below. Datasets are
deleted (and garbage-collected) when a test is done with them so their shared memory is released.
"""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pytest
import torch
from corpora import BLOCK, VOCAB, run_ranks, sample_keys, stdlib_corpus

from acomp.data import (
    CorpusDataset,
    CorruptShardError,
    build_dataloader,
    check_manifest,
    read_manifest,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory)


@pytest.fixture(autouse=True)
def _release_shared_memory():
    yield
    gc.collect()


def _epoch(corpus, split="train", *, seed=0, batch_size=4, num_workers=0, shuffle=True, drop_last=False):
    ds = CorpusDataset(corpus, split, seed=seed, batch_size=batch_size, shuffle=shuffle)
    keys = [
        k
        for b in build_dataloader(ds, batch_size, num_workers=num_workers, drop_last=drop_last)
        for k in sample_keys(b)
    ]
    del ds
    return keys


def _all_keys(corpus, split="train"):
    ds = CorpusDataset(corpus, split, shuffle=False, batch_size=1)
    keys = {(s["doc_id"], s["block_index"]) for s in (ds[i] for i in range(ds.num_samples))}
    del ds
    return keys


def test_sample_and_batch_format(corpus):
    ds = CorpusDataset(corpus, "val", batch_size=3)
    sample = ds[0]
    assert sample["input_ids"].dtype == torch.long and sample["input_ids"].shape == (BLOCK,)
    assert isinstance(sample["domain"], str) and isinstance(sample["doc_id"], str)
    assert int(sample["input_ids"].max()) < VOCAB
    batch = next(iter(build_dataloader(ds, 3)))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, BLOCK)
    assert batch["domain"] == ["stdlib"] * 3 and len(batch["doc_id"]) == 3
    assert ds.block_size == BLOCK and ds.vocab_size == VOCAB and ds.manifest["block_size"] == BLOCK


def test_shuffle_is_deterministic_by_seed(corpus):
    a, b = _epoch(corpus, seed=7), _epoch(corpus, seed=7)
    c = _epoch(corpus, seed=8)
    ordered = _epoch(corpus, shuffle=False)
    assert a == b and a != c and a != ordered
    assert set(a) == set(c) == set(ordered) == _all_keys(corpus)


def test_dataloader_workers_split_the_epoch(corpus):
    keys = _epoch(corpus, num_workers=2)
    assert len(keys) == len(set(keys)) and set(keys) == _all_keys(corpus)


@pytest.mark.slow
def test_two_ranks_disjoint_union_and_resume(corpus, tmp_path):
    reports = run_ranks(corpus, "train", tmp_path, world_size=2, batch_size=2, num_workers=1, stop_after=5)
    everything = _all_keys(corpus)
    per_rank = [[tuple(k) for k in r["full"]] for r in reports]
    r0, r1 = (set(k) for k in per_rank)
    assert r0 | r1 == everything
    # streaming pads the last round by repeating samples so both ranks stay in lockstep: at most world-1
    assert len(r0 & r1) == (-len(everything)) % 2
    assert len(per_rank[0]) == len(per_rank[1])
    for r, full in zip(reports, per_rank):
        first, rest = [tuple(k) for k in r["first"]], [tuple(k) for k in r["rest"]]
        assert r["state"]["sample_in_epoch"] == 5 * 2 * 2  # 5 batches x 2 samples x 2 ranks
        assert first + rest == full, "resumption on a rank repeated or skipped samples"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_is_exact(corpus, num_workers):
    full = _epoch(corpus, seed=3, num_workers=num_workers, drop_last=True)
    ds = CorpusDataset(corpus, "train", seed=3, batch_size=4)
    dl = build_dataloader(ds, 4, num_workers=num_workers)
    first = []
    for i, batch in enumerate(dl):
        first += sample_keys(batch)
        if i == 10:
            break
    state = json.loads(json.dumps(dl.state_dict()))  # as saved in a checkpoint
    assert state["sample_in_epoch"] == 44
    del dl, ds
    gc.collect()
    ds = CorpusDataset(corpus, "train", seed=3, batch_size=4)
    dl = build_dataloader(ds, 4, num_workers=num_workers)
    dl.load_state_dict(state)
    rest = [k for b in dl for k in sample_keys(b)]
    assert first + rest == full
    assert not set(first) & set(rest)


def test_batch_size_must_match(corpus):
    ds = CorpusDataset(corpus, "val", batch_size=4)
    with pytest.raises(ValueError, match="batch_size=4 but the dataloader uses 2"):
        build_dataloader(ds, 2)


def test_remote_style_read_through_local_cache(corpus, tmp_path):
    # A plain path as the remote exercises streaming's remote+local code path (copy + xxh64 check).
    cache = tmp_path / "cache"
    ds = CorpusDataset(str(corpus), "val", shuffle=False, batch_size=2, local_cache=cache)
    keys = [k for b in build_dataloader(ds, 2, drop_last=False) for k in sample_keys(b)]
    assert set(keys) == _all_keys(corpus, "val")
    assert (cache / "manifest.json").is_file() and list((cache / "val").glob("shard.*.mds"))


def test_remote_corrupted_shard_is_named(corpus, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(corpus, remote)
    shard = next((remote / "val").glob("shard.*.mds"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = CorpusDataset(str(remote), "val", shuffle=False, batch_size=1, local_cache=tmp_path / "cache")
    with pytest.raises(
        CorruptShardError,
        match=rf"val/{shard.name} fails its xxh64 checksum: the copy downloaded from {shard}",
    ):
        ds[0]


# ---------------------------------------------------------------- manifest checks


def test_manifest_checked_against_the_model(corpus):
    m = read_manifest(corpus)
    check_manifest(m, vocab_size=VOCAB + 64, block_size=BLOCK, special_tokens={"sum": "<sum>", "eoc": 3})
    with pytest.raises(ValueError, match=rf"vocab_size mismatch.*{VOCAB} tokens.*only 1000 rows"):
        check_manifest(m, vocab_size=1000)
    with pytest.raises(ValueError, match=rf"block_size mismatch.*{BLOCK} tokens.*expects 6144"):
        check_manifest(m, block_size=6144)
    with pytest.raises(
        ValueError, match="special_tokens mismatch for 'sum': the corpus has '<sum>'.*'<summary>'"
    ):
        check_manifest(m, special_tokens={"sum": "<summary>"})
    with pytest.raises(ValueError, match="special_tokens mismatch for 'eoc': the corpus has 3.*7"):
        check_manifest(m, special_tokens={"eoc": 7})
    with pytest.raises(ValueError, match="expects a 'mask' token"):
        check_manifest(m, special_tokens={"mask": "<mask>"})
    with pytest.raises(ValueError, match="vocab_size mismatch"):
        CorpusDataset(corpus, "val", vocab_size=100)


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no corpus manifest at {tmp_path}/manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path}/manifest.json is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(ValueError, match="lacks required keys .*block_size"):
        read_manifest(tmp_path)


def test_unknown_split_and_missing_corpus(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train', 'val'\]\)"):
        CorpusDataset(corpus, "test")
    with pytest.raises(FileNotFoundError, match="corpus directory .* does not exist"):
        CorpusDataset(tmp_path / "nothing")


# ---------------------------------------------------------------- damaged shards


@pytest.fixture
def damaged(corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    return copy, next((copy / "train").glob("shard.*.mds"))


def test_truncated_shard_is_reported_by_name(damaged):
    copy, shard = damaged
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(
        CorruptShardError, match=rf"shard {shard} is \d+ bytes but .*index.json records \d+: truncated"
    ):
        CorpusDataset(copy, "train")
    ds = CorpusDataset(copy, "train", verify="none", shuffle=False, batch_size=1)
    with pytest.raises(CorruptShardError, match=rf"of shard {shard}"):
        [ds[i] for i in range(ds.num_samples)]


def test_corrupted_shard_fails_its_checksum(damaged):
    copy, shard = damaged
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    CorpusDataset(copy, "train")  # same size: the cheap check passes
    with pytest.raises(CorruptShardError, match=rf"shard {shard} fails its xxh64 checksum"):
        CorpusDataset(copy, "train", verify="hash")


def zero_64_bytes(shard) -> None:
    """Same-size corruption whose decoded ids stay inside the vocabulary."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_same_size_corruption_is_caught_on_first_read(damaged, num_workers):
    """The default check hashes each shard when a process first reads it; a worker's error arrives as the
    same one line (acomp.train.data.Batches), not wrapped in the worker's traceback."""
    from acomp.train.data import Batches

    copy, shard = damaged
    zero_64_bytes(shard)
    ds = CorpusDataset(copy, "train", batch_size=4)  # the sizes match: construction passes
    batches = Batches(build_dataloader(ds, 4, num_workers=num_workers))
    with pytest.raises(CorruptShardError) as raised:
        next(batches)
    assert str(raised.value) == f"shard {shard} fails its xxh64 checksum: corrupted; rebuild the corpus"
    del batches, ds, raised  # the traceback holds the loader's iterator: let its worker go now
    gc.collect()
    ds = CorpusDataset(copy, "train", batch_size=4, verify="none")  # unchecked: it reads
    assert next(iter(build_dataloader(ds, 4)))["input_ids"].shape == (4, BLOCK)
    del ds


def test_each_shard_is_hashed_once_per_process(corpus, monkeypatch):
    import acomp.data.dataset as dataset

    hashed = []
    real = dataset.file_hash
    monkeypatch.setattr(dataset, "file_hash", lambda path, algo: hashed.append(path) or real(path, algo))
    ds = CorpusDataset(corpus, "train", shuffle=False, batch_size=1)
    for _ in range(2):
        for i in range(ds.num_samples):
            ds[i]
    assert sorted(hashed) == sorted(ds.shard_path(i) for i in range(len(ds.shards)))
    hashed.clear()
    ds = CorpusDataset(corpus, "train", shuffle=False, batch_size=1, verify="hash")  # all hashed up front
    for i in range(ds.num_samples):
        ds[i]
    assert len(hashed) == len(ds.shards) and ds.verified_shards == set(range(len(ds.shards)))
    del ds


def test_missing_shard_and_broken_index(damaged):
    copy, shard = damaged
    shard.unlink()
    with pytest.raises(CorruptShardError, match=rf"shard {shard} listed in .* is missing"):
        CorpusDataset(copy, "train")
    (copy / "train" / "index.json").write_text("{")
    # read_manifest's consistency check may see it first (ValueError), else the shard check does
    with pytest.raises(
        (CorruptShardError, ValueError), match=r"train/index.json is not (valid JSON|a readable)"
    ):
        CorpusDataset(copy, "train")


def test_ids_match_the_stored_blocks(corpus):
    ds = CorpusDataset(corpus, "val", shuffle=False, batch_size=1)
    raw = super(CorpusDataset, ds).get_item(0)
    assert np.array_equal(ds[0]["input_ids"].numpy(), raw["input_ids"].astype(np.int64))


def test_many_datasets_in_one_process_keep_file_descriptors_bounded(corpus, monkeypatch):
    """streaming probes every existing shared-memory prefix when a dataset starts; the probe handles must close
    (before the fix: ~4,900 descriptors after 30 datasets, each in its own temp dir as a test session has)."""
    import os
    import tempfile

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    start = open_fds()
    for _ in range(30):
        monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp())
        dataset = CorpusDataset(str(corpus), split="val", shuffle=False, batch_size=1)
        assert dataset[0]["input_ids"].shape == (BLOCK,)
        del dataset
        gc.collect()
    assert open_fds() - start < 30 * 20  # streaming keeps ~12 per dataset it created until exit: linear


def test_a_prefix_taken_by_another_job_between_scan_and_create_is_scanned_again(corpus, monkeypatch):
    """Two jobs started at once can both find prefix P free; the one that creates second must take another
    (before the fix: FileExistsError out of the dataset, as a parallel quality arm hit it)."""
    from streaming.base.shared import prefix

    real_scan = prefix._check_and_find_retrying
    other_job = []

    def scan_then_lose_the_race(*args, **kwargs):
        found = real_scan(*args, **kwargs)
        if not other_job:  # the other job registers the same prefix right after our scan
            name = prefix._get_path(found, prefix.LOCALS)
            other_job.append((found, prefix.SharedMemory(name, True, 64)))
        return found

    monkeypatch.setattr(prefix, "_check_and_find_retrying", scan_then_lose_the_race)
    ds = CorpusDataset(corpus, "val", shuffle=False, batch_size=1)
    ((taken, segment),) = other_job
    assert ds._shm_prefix_int != taken
    assert ds[0]["input_ids"].shape == (BLOCK,)
    del ds
    segment.cleanup()
