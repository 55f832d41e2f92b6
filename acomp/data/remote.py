"""Corpora in object storage: upload a built corpus, and mirror a remote corpus' manifest and tokenizer into
a local cache before streaming reads its shards.

mosaicml-streaming downloads split indexes and shards on demand but knows nothing of ``manifest.json`` and
``tokenizer/``, which the trainer needs before the first shard is read. :func:`fetch_corpus` brings those
into the cache and keeps the cache consistent with the remote corpus (a cache of another build is cleared,
so stale shards are never mixed with a new index); :func:`upload_corpus` writes a corpus so that it is never
seen half-uploaded (``manifest.json`` last). The failures a user meets first (wrong credentials, a missing
bucket or corpus, an unreachable endpoint) become one :class:`RemoteError` line naming the URI, after a few
quick retries instead of a retry storm.

S3 and S3-compatible stores (MinIO, Ceph, R2, ...) are reached through boto3 as streaming reaches them:
credentials from boto3's standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
instance roles; none at all = unsigned requests, for public buckets), the endpoint from ``S3_ENDPOINT_URL``
(streaming's variable) or else ``AWS_ENDPOINT_URL``. Other schemes streaming reads (``gs://``, ``oci://``,
``azure://``, ...) are fetched through streaming's own downloaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from .manifest import MANIFEST_NAME, read_manifest

# Seconds to open a connection, and attempts per request: a dead endpoint fails in seconds, not minutes.
CONNECT_TIMEOUT_S = 5
ATTEMPTS = 3
# The files transformers' save_pretrained writes for a fast tokenizer; the first two are required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
REQUIRED_TOKENIZER_FILES = TOKENIZER_FILES[:2]
# Marks a directory as a corpus cache, so that clearing a stale cache never touches anything else.
CACHE_MARK = ".acomp-corpus-cache"
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AllAccessDisabled",
    "403",
}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class RemoteError(OSError):
    """The object store refused, could not be reached, or holds no (complete) corpus; the message is one line
    naming the URI and what to check."""


def split_uri(uri: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b/`` -> (``s3``, ``bucket``, ``a/b``)."""
    parsed = urllib.parse.urlparse(uri)
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


class S3Corpus:
    """The objects of one corpus under ``s3://bucket/prefix``, read and written by name (``train/index.json``)."""

    def __init__(self, uri: str, timeout: float = 60):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        scheme, self.bucket, self.prefix = split_uri(uri)
        if scheme != "s3" or not self.bucket:
            raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        session = boto3.session.Session()
        unsigned = session.get_credentials() is None  # public buckets, as streaming does
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=timeout,
            retries={"mode": "standard", "max_attempts": ATTEMPTS},
            signature_version=UNSIGNED if unsigned else None,
        )
        self.client = session.client(
            "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=config
        )
        self.unsigned = unsigned

    def url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str, optional: bool = False) -> bytes | None:
        """The object's bytes, or None when it does not exist (``optional``: or is not readable)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()
        except _boto_errors() as err:
            code = _code(err)
            if code in _MISSING or (optional and code in _DENIED):
                return None  # without s3:ListBucket a missing key answers 403, not 404
            raise self.explain(err, name) from None

    def put(self, name: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self.key(name))
        except _boto_errors() as err:
            raise self.explain(err, name) from None

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
        except _boto_errors() as err:
            raise self.explain(err, name) from None

    def explain(self, err: Exception, name: str) -> RemoteError:
        """One line for what went wrong with object `name`: credentials, bucket, endpoint, or other."""
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        endpoint = self.client.meta.endpoint_url
        url = self.url(name)
        if isinstance(err, ClientError):
            code, message = _code(err), err.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                return RemoteError(f"{url}: bucket {self.bucket!r} does not exist at {endpoint}")
            if code in _DENIED:
                who = (
                    "no credentials were found (unsigned request)"
                    if self.unsigned
                    else "check the credentials"
                )
                return RemoteError(
                    f"{url}: access denied by {endpoint} ({code}: {message or 'forbidden'}); {who}: "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and their permissions on the bucket"
                )
            return RemoteError(f"{url}: {code or type(err).__name__} from {endpoint}: {message or err}")
        if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
            return RemoteError(
                f"{url}: cannot reach the object store at {endpoint} after {ATTEMPTS} attempts ({err}); "
                f"check S3_ENDPOINT_URL / AWS_ENDPOINT_URL and the network"
            )
        if isinstance(err, ReadTimeoutError):
            return RemoteError(f"{url}: the object store at {endpoint} stopped answering ({err})")
        return RemoteError(f"{url}: {type(err).__name__}: {err}")


class StreamingCorpus:
    """Read-only access through streaming's downloaders, for the schemes other than s3:// (and plain paths)."""

    def __init__(self, uri: str, timeout: float = 60):
        self.uri = uri.rstrip("/")
        self.timeout = timeout

    def url(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def get(self, name: str, optional: bool = False) -> bytes | None:
        from streaming.base.storage import CloudDownloader

        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, "object")
            try:
                CloudDownloader.direct_download(self.url(name), target, self.timeout)
            except FileNotFoundError:
                return None
            except Exception as err:
                if optional:
                    return None
                first = (str(err).strip().splitlines() or [""])[0]
                raise RemoteError(f"cannot fetch {self.url(name)}: {type(err).__name__}: {first}") from None
            return Path(target).read_bytes()


def open_remote(uri: str, timeout: float = 60) -> S3Corpus | StreamingCorpus:
    return S3Corpus(uri, timeout) if split_uri(uri)[0] == "s3" else StreamingCorpus(uri, timeout)


def stage_dir(uri: str) -> Path:
    """Where ``preprocess/build_corpus.py --out URI`` builds before uploading: stable per URI, so a rerun after
    an interrupted upload finds the build up to date and only uploads."""
    return Path(tempfile.gettempdir()) / "acomp-corpus-stage" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def is_local_leader() -> bool:
    """Local rank 0 (``LOCAL_RANK``, as streaming reads it) fills a node's cache; the other ranks wait for it."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def fetch_corpus(uri: str, cache: str | os.PathLike, *, timeout: float = 60) -> dict:
    """Mirror the remote corpus' ``manifest.json`` and ``tokenizer/`` into `cache`; returns the manifest.

    Every rank reads the remote manifest (so a bad URI, bucket, credential or endpoint fails every rank at
    once, with the same line). Local rank 0 then brings the cache in line: when its manifest differs from
    the remote one (another build, or an empty cache), the cached tokenizer, indexes and shards are removed
    before the new tokenizer and, last, the new manifest are written; other local ranks wait until the cache
    holds the remote manifest. Shards already cached for this manifest are kept (no second download).
    """
    cache = Path(cache)
    remote = open_remote(uri, timeout)
    manifest = remote.get(MANIFEST_NAME)
    if manifest is None:
        raise RemoteError(
            f"no corpus at {remote.uri}: {remote.url(MANIFEST_NAME)} does not exist (an upload writes it last: "
            f"upload with `python -m acomp.data upload DIR {remote.uri}`)"
        )
    try:
        json.loads(manifest)
    except ValueError as err:
        raise RemoteError(
            f"{remote.url(MANIFEST_NAME)} is not valid JSON ({err}); re-upload the corpus"
        ) from None
    if is_local_leader():
        _refresh(remote, cache, manifest)
    else:
        _await(remote, cache, manifest, timeout)
    return read_manifest(cache)


def _refresh(remote, cache: Path, manifest: bytes) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    mark = cache / CACHE_MARK
    if not mark.is_file():
        if any(cache.iterdir()):
            raise RemoteError(
                f"the corpus cache directory {cache} is not empty and is not a corpus cache (no {CACHE_MARK}); "
                f"give a new or empty directory"
            )
        mark.write_text(f"cache of {remote.uri}, filled by acomp.data.remote\n")
    target = cache / MANIFEST_NAME
    current = target.read_bytes() if target.is_file() else None
    if current != manifest:  # another build, or a refresh that was interrupted: start from nothing
        target.unlink(missing_ok=True)
        for child in cache.iterdir():
            if child.name == CACHE_MARK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    tokenizer = cache / "tokenizer"
    if not tokenizer.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=cache))
        for name in TOKENIZER_FILES:
            data = remote.get(f"tokenizer/{name}", optional=name not in REQUIRED_TOKENIZER_FILES)
            if data is None and name in REQUIRED_TOKENIZER_FILES:
                raise RemoteError(
                    f"{remote.url('tokenizer/' + name)} does not exist: the corpus upload is incomplete"
                )
            if data is not None:
                (staging / name).write_bytes(data)
        os.rename(staging, tokenizer)
    if current != manifest:
        _write_atomically(target, manifest)


def _await(remote, cache: Path, manifest: bytes, timeout: float) -> None:
    target, deadline = cache / MANIFEST_NAME, time.monotonic() + timeout
    while not (target.is_file() and target.read_bytes() == manifest and (cache / "tokenizer").is_dir()):
        if time.monotonic() > deadline:
            raise RemoteError(
                f"waited {timeout:g} s for local rank 0 to fetch the manifest and tokenizer of {remote.uri} into "
                f"{cache}; see its error"
            )
        time.sleep(0.05)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def corpus_files(local: Path, manifest: dict) -> list[str]:
    """The files a reader fetches, in upload order and without the manifest: tokenizer, then per split its
    shards (the compressed file when the split is compressed: that is what streaming downloads) and index."""
    files = [p.relative_to(local).as_posix() for p in sorted((local / "tokenizer").iterdir()) if p.is_file()]
    for split in sorted(manifest["splits"]):
        index_path = local / split / "index.json"
        if not index_path.is_file():
            if manifest["splits"][split].get("blocks"):
                raise FileNotFoundError(f"{index_path} is missing: the split {split!r} is incomplete")
            continue
        for shard in json.loads(index_path.read_text())["shards"]:
            files.append(f"{split}/{(shard.get('zip_data') or shard['raw_data'])['basename']}")
        files.append(f"{split}/index.json")
    return files


def upload_corpus(
    local: str | os.PathLike, uri: str, *, overwrite: bool = False, log: Callable[[str], None] = print
) -> int:
    """Upload a built corpus directory to ``s3://bucket/prefix``; returns the number of files uploaded.

    Shards are checked against their index (xxh64) first, so a damaged corpus is not published. The
    tokenizer, shards and indexes go first and ``manifest.json`` last: readers treat a prefix without a
    manifest as no corpus, so an interrupted upload is never read as complete (run the command again). A
    prefix already holding this corpus (the same manifest) is left as it is; one holding another corpus is
    refused unless `overwrite`, which removes its manifest before anything else is written.
    """
    from .dataset import verify_shards

    local = Path(local)
    manifest = read_manifest(local)
    if split_uri(uri)[0] != "s3":
        raise ValueError(
            f"upload supports s3:// URIs (AWS or any S3-compatible endpoint), got {uri!r}; for other stores copy "
            f"the directory with their own tool, manifest.json last"
        )
    for split in manifest["splits"]:
        if (local / split / "index.json").is_file():
            verify_shards(local / split, "hash")
    files = corpus_files(local, manifest)
    remote = S3Corpus(uri)
    data = (local / MANIFEST_NAME).read_bytes()
    existing = remote.get(MANIFEST_NAME)
    if existing == data:
        log(f"{remote.uri} already holds this corpus (the same manifest.json): nothing to upload")
        return 0
    if existing is not None:
        if not overwrite:
            theirs = _fingerprint(existing)
            raise RemoteError(
                f"{remote.uri} already holds another corpus (fingerprint {theirs}, this one "
                f"{manifest.get('fingerprint')}); pass --overwrite to replace it"
            )
        remote.delete(MANIFEST_NAME)  # from here on readers see no corpus until the new manifest lands
    for i, name in enumerate(files, 1):
        size = (local / name).stat().st_size
        remote.put(name, local / name)
        log(f"[{i}/{len(files) + 1}] {remote.url(name)} ({size / 1e6:.1f} MB)")
    remote.put(MANIFEST_NAME, local / MANIFEST_NAME)
    log(f"[{len(files) + 1}/{len(files) + 1}] {remote.url(MANIFEST_NAME)}: the corpus is complete")
    return len(files) + 1


def _fingerprint(manifest: bytes) -> str | None:
    try:
        return json.loads(manifest).get("fingerprint")
    except ValueError:
        return None


def _boto_errors() -> tuple[type[Exception], ...]:
    """What a boto3 call raises for a refused, failed or unreachable request (ClientError is no BotoCoreError)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError, Boto3Error, OSError


def _code(err) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
