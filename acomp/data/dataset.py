"""Training-time reading: a StreamingDataset over a built corpus, its collation and its dataloader.

Sharding across ranks and dataloader workers, deterministic shuffling and mid-epoch resumption are
mosaicml-streaming's; this module adds what is specific to our corpora: it checks the manifest against the
model before anything is read, checks shard files against ``index.json`` (sizes up front; each shard's xxh64
when a process first reads from it, so a damaged shard is reported by name instead of being trained on), and
turns samples into ``LongTensor`` blocks. A remote corpus (``s3://...``) is read through a local cache that
:mod:`acomp.data.remote` fills with its manifest and tokenizer; streaming downloads the shards into it.

Ranks come from the standard env vars (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), as
streaming reads them; with ``WORLD_SIZE > 1`` and no process group yet, streaming starts a gloo/nccl one from
``MASTER_ADDR``/``MASTER_PORT``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset

from .manifest import check_manifest, read_manifest
from .remote import fetch_corpus


def _close_probed_shared_memory() -> None:
    """mosaicml-streaming (0.13) looks for a free shared-memory prefix for each new dataset by attaching to the
    segments of the existing prefixes, through handles whose exit hook keeps them open until the process ends.
    A process that makes many datasets (an evaluation every N steps, a test session) then leaks file
    descriptors quadratically and fails with "Too many open files". A handle that only attaches to a segment
    (create=False) owns nothing to clean up: without the exit hook it closes when dropped."""
    from streaming.base.shared import SharedMemory, prefix

    if prefix.SharedMemory is not SharedMemory:
        return  # already done (or streaming changed how it probes)

    class AttachOnlyClosesWhenDropped(SharedMemory):
        def __init__(self, name=None, create=None, size=0, auto_cleanup=True):
            super().__init__(name, create, size, auto_cleanup=auto_cleanup and create is not False)

    prefix.SharedMemory = AttachOnlyClosesWhenDropped


_close_probed_shared_memory()

# none: no checks; size: shard sizes up front (local corpora) and each shard's hash when first read (default);
# hash: every shard's hash up front as well (local corpora; reads the whole corpus before the first step).
VERIFY_LEVELS = ("none", "size", "hash")
HASH_CHUNK = 1 << 22
SHM_PREFIX_ATTEMPTS = 5  # CorpusDataset._init_streaming


class CorruptShardError(RuntimeError):
    """A shard file is missing, truncated, or fails its checksum; the message names the file."""


def is_remote(path_or_uri: str | os.PathLike) -> bool:
    """True for ``s3://``, ``gs://``, ``oci://``, ... URIs (anything streaming downloads from)."""
    return "://" in str(path_or_uri) and not str(path_or_uri).startswith("file://")


def default_cache_dir(uri: str) -> Path:
    """Stable per-URI local cache, so shards downloaded once are reused by later runs."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "acomp-corpus-cache" / digest


def _read_index(split_dir: Path) -> dict[str, Any]:
    index_path = split_dir / "index.json"
    try:
        return json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no MDS index at {index_path}: is this a built corpus split?") from None
    except json.JSONDecodeError as err:
        raise CorruptShardError(
            f"MDS index {index_path} is not valid JSON ({err.msg}); rebuild the corpus"
        ) from None


def file_hash(path: str | Path, algo: str) -> str:
    """Hex digest of a file as streaming writes it into ``index.json`` (``xxh64`` or a hashlib name), read in
    4 MiB chunks."""
    if algo.startswith("xxh"):
        import xxhash

        h = getattr(xxhash, algo)()
    else:
        h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def shard_checksum(info: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, digest) recorded for a shard file in ``index.json``: xxh64, else sha1; None if neither."""
    hashes = info.get("hashes") or {}
    algo = next((a for a in ("xxh64", "sha1") if a in hashes), None)
    return None if algo is None else (algo, hashes[algo])


def verify_shards(split_dir: str | Path, level: str = "size") -> int:
    """Check every shard of an MDS split against its ``index.json``; returns the number checked.

    ``size`` (cheap, catches truncation) compares file sizes; ``hash`` also recomputes each shard's xxh64
    (or sha1) and catches same-size corruption at the cost of reading every byte.
    """
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify={level!r}: choose one of {VERIFY_LEVELS}")
    split_dir = Path(split_dir)
    index = _read_index(split_dir)
    if level == "none":
        return 0
    for shard in index["shards"]:
        candidates = [info for info in (shard.get("raw_data"), shard.get("zip_data")) if info]
        present = [info for info in candidates if (split_dir / info["basename"]).is_file()]
        if not present:
            names = " or ".join(str(split_dir / info["basename"]) for info in candidates)
            raise CorruptShardError(f"shard {names} listed in {split_dir / 'index.json'} is missing")
        for info in present:
            path = split_dir / info["basename"]
            size = path.stat().st_size
            if size != info["bytes"]:
                raise CorruptShardError(
                    f"shard {path} is {size} bytes but {split_dir / 'index.json'} records {info['bytes']}: "
                    f"truncated or corrupted; rebuild or re-download the corpus"
                )
            if level == "hash":
                recorded = shard_checksum(info)
                if recorded is None:
                    raise CorruptShardError(
                        f"shard {path} has no xxh64/sha1 hash in its index; cannot verify"
                    )
                if file_hash(path, recorded[0]) != recorded[1]:
                    raise CorruptShardError(
                        f"shard {path} fails its {recorded[0]} checksum: corrupted; rebuild the corpus"
                    )
    return len(index["shards"])


class CorpusDataset(StreamingDataset):
    """Blocks of a corpus built by ``build_corpus``, streamed from a local dir or a remote URI.

    Each sample is ``{"input_ids": LongTensor[block_size], "domain": str, "doc_id": str, "block_index": int}``.
    ``seed`` fixes the shuffle; ``batch_size`` must be the per-device batch size of the dataloader (streaming
    partitions by it; :func:`build_dataloader` fills it in when left ``None``). ``vocab_size`` /
    ``block_size`` / ``special_tokens`` are the model's, checked against the manifest before reading.
    For a remote URI (or with ``local_cache`` set) the manifest and tokenizer are fetched into
    ``local_cache`` first (:func:`acomp.data.remote.fetch_corpus`) and shards are downloaded there on demand;
    ``manifest`` skips that fetch when the caller has just done it (the trainer: once per run).

    ``verify`` (:data:`VERIFY_LEVELS`): unless ``none``, every shard's xxh64 is checked the first time this
    process reads from it, local and remote alike, and a mismatch raises :class:`CorruptShardError` naming
    the file; ``size`` (default) also checks a local corpus' shard sizes at construction, ``hash`` its hashes.
    """

    def __init__(
        self,
        path_or_uri: str | os.PathLike,
        split: str = "train",
        *,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        local_cache: str | os.PathLike | None = None,
        vocab_size: int | None = None,
        block_size: int | None = None,
        special_tokens: dict[str, str | int] | None = None,
        verify: str = "size",
        manifest: dict[str, Any] | None = None,
        epoch_size: int | str | None = None,
        predownload: int | None = None,
        cache_limit: int | str | None = None,
        num_canonical_nodes: int | None = None,
        shuffle_algo: str = "py1e",
        shuffle_block_size: int | None = None,
        download_timeout: float = 60,
        replication: int | None = None,
    ) -> None:
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify={verify!r}: choose one of {VERIFY_LEVELS}")
        source = str(path_or_uri)
        if is_remote(source) or local_cache is not None:
            remote: str | None = source.rstrip("/")
            local = Path(local_cache) if local_cache is not None else default_cache_dir(source)
            if manifest is None:  # RemoteError (an OSError) names the URI and the cause
                fetch_corpus(remote, local, timeout=download_timeout)
        else:
            remote = None
            local = Path(source.removeprefix("file://"))
            if not local.is_dir():
                raise FileNotFoundError(f"corpus directory {local} does not exist")
        if manifest is None:
            manifest = read_manifest(local)
        check_manifest(manifest, vocab_size=vocab_size, block_size=block_size, special_tokens=special_tokens)
        splits = manifest["splits"]
        if split not in splits:
            raise ValueError(f"corpus {source} has no split {split!r} (splits: {sorted(splits)})")
        if not splits[split]["blocks"]:
            raise ValueError(f"split {split!r} of corpus {source} is empty (0 blocks); see its manifest.json")
        if remote is None:
            verify_shards(local / split, verify)

        self._init_streaming(
            remote=remote,
            local=str(local),
            split=split,
            shuffle=shuffle,
            shuffle_seed=seed,
            batch_size=batch_size,
            validate_hash=None,  # hashed on first read instead (_check_shard), naming the file
            epoch_size=epoch_size,
            predownload=predownload,
            cache_limit=cache_limit,
            num_canonical_nodes=num_canonical_nodes,
            shuffle_algo=shuffle_algo,
            shuffle_block_size=shuffle_block_size,
            download_timeout=download_timeout,
            replication=replication,
        )
        self.manifest = manifest
        self.source = source
        self.remote_dir = remote
        self.corpus_split = split
        self.block_size = int(manifest["block_size"])
        self.vocab_size = int(manifest["vocab_size"])
        self.verify = verify
        # Shards whose hash this process has checked (a dataloader worker is a process with its own copy).
        self.verified_shards: set[int] = (
            set(range(len(self.shards))) if verify == "hash" and remote is None else set()
        )
        self._check_columns(local / split)

    def _init_streaming(self, **kwargs) -> None:
        """StreamingDataset.__init__, again if another process on this host took our shared-memory prefix.

        streaming (0.13) picks the lowest free prefix, then creates its segment: two jobs starting at the same
        moment (arms run side by side, two single-GPU jobs on one node) can pick the same one, and the second
        create fails with FileExistsError. A one-process group scans again; the ranks of a larger one must
        agree on their prefix, so there the error stands."""
        import random
        import time

        import torch.distributed as tdist

        alone = not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1
        for attempt in range(SHM_PREFIX_ATTEMPTS):
            try:
                return super().__init__(**kwargs)
            except FileExistsError:
                if not alone or attempt == SHM_PREFIX_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.5))

    def _check_columns(self, split_dir: Path) -> None:
        index = _read_index(split_dir)
        want = self.manifest.get("columns", {}).get("input_ids")
        for shard in index["shards"][:1]:
            encodings = dict(zip(shard["column_names"], shard["column_encodings"]))
            if want is not None and encodings.get("input_ids") != want:
                raise ValueError(
                    f"{split_dir / 'index.json'}: input_ids are stored as {encodings.get('input_ids')!r} but the "
                    f"manifest says {want!r}; the split does not belong to this manifest"
                )

    def shard_path(self, shard_id: int) -> str:
        """Local path of a shard (for error messages)."""
        reader = self.shards[shard_id]
        return os.path.join(reader.dirname, reader.split or "", reader.raw_data.basename)

    def shard_url(self, shard_id: int) -> str:
        """Where a shard comes from: its remote URL, or its local path."""
        if self.remote_dir is None:
            return self.shard_path(shard_id)
        reader = self.shards[shard_id]
        info = reader.zip_data or reader.raw_data
        return f"{self.remote_dir}/{self.corpus_split}/{info.basename}"

    def _check_shard(self, shard_id: int) -> None:
        """Have the shard here (download / decompress it) and check its xxh64 against ``index.json``."""
        path = self.shard_path(shard_id)
        try:
            self.prepare_shard(shard_id)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise CorruptShardError(
                f"cannot fetch shard {self.shard_url(shard_id)} into {path}: {type(err).__name__}: {first}"
            ) from None
        info = self.shards[shard_id].raw_data
        recorded = shard_checksum({"hashes": info.hashes})
        if recorded is None:
            raise CorruptShardError(
                f"shard {path} has no xxh64/sha1 hash in its index; cannot verify it (data.verify=none reads "
                f"it unchecked)"
            )
        algo, digest = recorded
        try:
            actual = file_hash(path, algo)
        except OSError as err:
            raise CorruptShardError(f"cannot read shard {path}: {err}") from None
        if actual != digest:
            if self.remote_dir is None:
                raise CorruptShardError(
                    f"shard {path} fails its {algo} checksum: corrupted; rebuild the corpus"
                )
            raise CorruptShardError(
                f"shard {path} fails its {algo} checksum: the copy downloaded from {self.shard_url(shard_id)} "
                f"is corrupted (remote or in transit); delete the cached file and rerun, or rebuild and "
                f"re-upload the corpus"
            )

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        shard_id, offset = self.spanner[sample_id]
        if self.verify != "none" and shard_id not in self.verified_shards:
            try:
                self._check_shard(shard_id)
            except CorruptShardError:
                if hasattr(self, "_event"):  # stop this epoch's download threads, as streaming does on errors
                    self._event.set()
                raise
            self.verified_shards.add(shard_id)
        try:
            sample = super().get_item(sample_id, retry)
            ids = sample["input_ids"]
            if ids.shape != (self.block_size,):
                raise ValueError(f"block has shape {ids.shape}, expected ({self.block_size},)")
            # Cheap, and catches corruption that the size check misses before it reaches the model.
            top, vocab = int(ids.max()), self.vocab_size
            if top >= vocab:
                raise ValueError(f"token id {top} is outside the corpus vocabulary ({vocab} tokens)")
        except Exception as err:
            raise CorruptShardError(
                f"cannot read sample {offset} of shard {self.shard_path(shard_id)}: {type(err).__name__}: {err}"
            ) from err
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64)),
            "domain": sample["domain"],
            "doc_id": sample["doc_id"],
            "block_index": int(sample["block_index"]),
        }


def collate_blocks(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack blocks into ``input_ids`` LongTensor [B, block_size]; labels stay Python lists."""
    return {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "domain": [s["domain"] for s in samples],
        "doc_id": [s["doc_id"] for s in samples],
        "block_index": torch.tensor([s["block_index"] for s in samples], dtype=torch.long),
    }


def build_dataloader(
    dataset: StreamingDataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = True,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
) -> StreamingDataLoader:
    """A StreamingDataLoader whose ``state_dict()``/``load_state_dict()`` resume exactly mid-epoch.

    The dataset must be partitioned with the loader's batch size (streaming's requirement for exact
    resumption); it is set here when the dataset was built with ``batch_size=None``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    current = getattr(dataset, "batch_size", None)
    if current is None:
        dataset.batch_size = batch_size
    elif current != batch_size:
        raise ValueError(
            f"the dataset was built with batch_size={current} but the dataloader uses {batch_size}; "
            f"they must match for streaming's partitioning and exact resumption"
        )
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_blocks,
        # Its own generator: starting an epoch's iterator would otherwise draw from torch's global one, which
        # model-side randomness (dropout) uses and checkpoints save, and a resumed run starts
        # its iterator after restoring that state, so its draws would shift. Streaming sets the data order.
        generator=torch.Generator(),
        **extra,
    )
