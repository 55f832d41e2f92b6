"""The corpus manifest (``OUT/manifest.json``): what was built, from what, with which tokenizer.

Training reads it before touching a shard and stops with a clear message when the corpus does not fit the
model (:func:`check_manifest`), instead of failing later with an index error deep inside an embedding.
Reading a corpus directory cross-checks the manifest against the split indexes and the tokenizer beside it
(:func:`check_consistency`), so an edited manifest is reported as such, not blamed on the config or a shard.
:func:`corpus_identity` / :func:`check_same_corpus` tell whether a path still holds the corpus a run
started from (a rebuild with ``--overwrite`` gives a new ``corpus_id`` whenever the token ids change).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "block_size",
    "vocab_size",
    "dtype",
    "tokenizer",
    "special_tokens",
    "special_token_ids",
    "splits",
)


def manifest_path(path: str | Path) -> Path:
    """``path`` itself if it names a file, else ``path/manifest.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / MANIFEST_NAME


def read_manifest(path: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """Load and validate a corpus manifest from a corpus directory or the manifest file itself.

    With ``check_files`` the manifest is cross-checked against the split indexes and the tokenizer present
    beside it (:func:`check_consistency`; absent ones are left to whoever reads them).
    """
    file = manifest_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no corpus manifest at {file}: build the corpus first (python preprocess/build_corpus.py ...)"
        ) from None
    except OSError as err:
        raise OSError(f"cannot read corpus manifest {file}: {err}") from err
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"corpus manifest {file} is not valid JSON ({err.msg} at line {err.lineno})"
        ) from None
    if not isinstance(manifest, dict):
        raise ValueError(f"corpus manifest {file} must hold a JSON object, got {type(manifest).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"corpus manifest {file} lacks required keys {missing}")
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"corpus manifest {file} has format_version {version!r}; this acomp reads up to {FORMAT_VERSION}"
        )
    if check_files:
        check_consistency(manifest, file.parent)
    return manifest


def _ids_column(shard: dict[str, Any]) -> str | None:
    encodings = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
    return encodings.get("input_ids")


def check_consistency(manifest: dict[str, Any], directory: str | Path, *, require: bool = False) -> None:
    """Raise ``ValueError`` ("manifest.json disagrees with train/index.json: ...", naming the key and both
    values) when the manifest does not describe the files beside it: the blocks and shards of each split,
    the block size and dtype the shards store, the tokenizer's size and special-token ids, and the
    ``corpus_id`` of the split indexes. Files that are absent are skipped unless ``require``."""
    directory = Path(directory)
    file = directory / MANIFEST_NAME
    hint = "the manifest was edited, or a file comes from another build; rebuild the corpus"
    want_ids = f"ndarray:{manifest['dtype']}:{manifest['block_size']}"
    indexes: dict[str, bytes] = {}
    for split, info in manifest["splits"].items():
        index_file = directory / split / "index.json"
        if not index_file.is_file():
            if require:
                raise ValueError(f"{index_file} is missing (the manifest lists split {split!r})")
            continue
        where = f"{file} disagrees with {split}/index.json"
        try:
            indexes[split] = index_file.read_bytes()
            shards = json.loads(indexes[split])["shards"]
            samples = sum(int(shard["samples"]) for shard in shards)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{index_file} is not a readable MDS index ({type(err).__name__}: {err}); {hint}"
            ) from None
        if info.get("blocks") != samples:
            raise ValueError(
                f"{where}: splits.{split}.blocks is {info.get('blocks')!r} but the index lists {samples} "
                f"samples in {len(shards)} shards ({hint})"
            )
        if "shards" in info and info["shards"] != len(shards):
            raise ValueError(
                f"{where}: splits.{split}.shards is {info['shards']!r} but the index lists {len(shards)} ({hint})"
            )
        stored = next((_ids_column(shard) for shard in shards), want_ids)
        if stored != want_ids:
            kind, _, rest = (stored or "").partition(":")
            dtype, _, length = rest.partition(":")
            key, value, found = (
                ("dtype", manifest["dtype"], f"{dtype} ids")
                if length == str(manifest["block_size"])
                else ("block_size", manifest["block_size"], f"blocks of {length or '?'} tokens")
            )
            raise ValueError(
                f"{where}: {key} is {value!r} but its shards store {found} (input_ids {stored!r}; {hint})"
            )
    _check_tokenizer(manifest, directory, require, hint)
    recorded = manifest.get("corpus_id")
    if recorded is not None and set(indexes) == set(manifest["splits"]):
        found = corpus_id(manifest, indexes)
        if found != recorded:
            names = "/index.json, ".join(sorted(indexes)) + "/index.json"
            raise ValueError(
                f"{file} disagrees with {names}: corpus_id is {recorded!r} but the indexes give {found!r} ({hint})"
            )


def _check_tokenizer(manifest: dict[str, Any], directory: Path, require: bool, hint: str) -> None:
    path = directory / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        if require:
            raise ValueError(f"{path} is missing")
        return
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust parser raises a bare Exception
        raise ValueError(f"{path} cannot be loaded ({err}); {hint}") from None
    where = f"{directory / MANIFEST_NAME} disagrees with tokenizer/tokenizer.json"
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != manifest["vocab_size"]:
        raise ValueError(
            f"{where}: vocab_size is {manifest['vocab_size']!r} but the tokenizer has {size} tokens ({hint})"
        )
    for role, token in manifest["special_tokens"].items():
        found, recorded = tok.token_to_id(token), manifest["special_token_ids"].get(role)
        if found != recorded:
            raise ValueError(
                f"{where}: special_token_ids.{role} is {recorded!r} but the tokenizer has {token!r} at id {found} ({hint})"
            )


def corpus_id(manifest: dict[str, Any], indexes: dict[str, bytes]) -> str:
    """Identity of a corpus' token ids: sha256 of the tokenizer's identity, the block shape and every split's
    ``index.json`` (which records each shard's size, sample count, sha1 and xxh64). Byte-identical builds
    share it; any change to a shard or the tokenizer changes it."""
    h = hashlib.sha256()
    head = {k: manifest[k] for k in ("block_size", "vocab_size", "dtype")}
    head["tokenizer_sha256"] = (manifest.get("tokenizer") or {}).get("sha256")
    h.update(json.dumps(head, sort_keys=True).encode())
    for split in sorted(indexes):
        h.update(f"\0{split}\0".encode())
        h.update(indexes[split])
    return h.hexdigest()


IDENTITY_KEYS = ("corpus_id", "tokenizer_sha256", "vocab_size", "block_size", "fingerprint")


class CorpusChangedError(ValueError):
    """The path no longer holds the corpus a run recorded (rebuilt with ``--overwrite``, or replaced)."""


def corpus_identity(path: str | Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the corpus at ``path`` (JSON-serialisable; ``manifest`` if already read): its
    ``corpus_id`` (the token ids), tokenizer sha256, vocab and block size, and the inputs' ``fingerprint``.
    Record it when a run starts; :func:`check_same_corpus` compares it later."""
    m = manifest if manifest is not None else read_manifest(path)
    return {
        "path": str(path),
        "corpus_id": m.get("corpus_id"),
        "tokenizer_sha256": (m.get("tokenizer") or {}).get("sha256"),
        "vocab_size": m["vocab_size"],
        "block_size": m["block_size"],
        "fingerprint": m.get("fingerprint"),
    }


def check_same_corpus(
    path: str | Path,
    recorded: dict[str, Any],
    *,
    since: str = "it was recorded",
    manifest: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`CorpusChangedError` naming the key and both values when the corpus at ``path`` is not
    the one ``recorded`` (a :func:`corpus_identity`) describes (``manifest``: its manifest, if already read,
    e.g. a remote corpus'). Keys a record lacks (written by an older acomp) are not compared. A missing or
    unreadable corpus raises what :func:`read_manifest` raises."""
    difference = identity_difference(recorded, corpus_identity(path, manifest))
    if difference is not None:
        key, old, new = difference
        raise CorpusChangedError(
            f"the corpus at {path} changed since {since}: its {key} is now {new!r}, was {old!r} "
            f"(rebuilt with --overwrite, or replaced?)"
        )


def identity_difference(recorded: dict[str, Any], now: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first identity key whose recorded value differs from `now`'s, as (key, recorded, now); None when
    they agree. Keys a record lacks (written by an older acomp) are not compared."""
    for key in IDENTITY_KEYS:
        old, new = recorded.get(key), now.get(key)
        if old is not None and new != old:
            return key, old, new
    return None


def check_manifest(
    manifest: dict[str, Any],
    *,
    vocab_size: int | None = None,
    block_size: int | None = None,
    special_tokens: dict[str, str | int] | None = None,
) -> None:
    """Raise ``ValueError`` naming the field and both values when the corpus does not fit the model.

    ``vocab_size`` is the model's number of embedding rows: it must be at least the corpus' vocabulary
    (a larger, padded table is fine). ``block_size`` must equal the corpus' block size. ``special_tokens``
    maps a role (``sum``, ``eoc``, ``bos``, ...) to the token string or id the model expects.
    """
    if vocab_size is not None and vocab_size < manifest["vocab_size"]:
        raise ValueError(
            f"vocab_size mismatch: the corpus was tokenized with {manifest['vocab_size']} tokens (ids up to "
            f"{manifest['vocab_size'] - 1}) but the model's embedding has only {vocab_size} rows; the model "
            f"needs at least {manifest['vocab_size']} (resize its token embeddings to len(tokenizer))"
        )
    if block_size is not None and block_size != manifest["block_size"]:
        raise ValueError(
            f"block_size mismatch: the corpus holds blocks of {manifest['block_size']} tokens but the run "
            f"expects {block_size}; rebuild the corpus with --block-size {block_size} or change the run's "
            f"sequence length"
        )
    for role, expected in (special_tokens or {}).items():
        table = manifest["special_token_ids"] if isinstance(expected, int) else manifest["special_tokens"]
        if role not in table:
            raise ValueError(
                f"special_tokens mismatch: the model expects a {role!r} token ({expected!r}) but the corpus "
                f"tokenizer has none (corpus special tokens: {manifest['special_tokens']})"
            )
        if table[role] != expected:
            raise ValueError(
                f"special_tokens mismatch for {role!r}: the corpus has {table[role]!r}, the model expects "
                f"{expected!r}"
            )


def write_manifest(manifest: dict[str, Any], directory: str | Path) -> Path:
    """Write ``directory/manifest.json`` with sorted keys (stable bytes for the same content)."""
    file = Path(directory) / MANIFEST_NAME
    file.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return file
