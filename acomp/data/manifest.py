"""The corpus manifest (``OUT/manifest.json``): what was built, from what, with which tokenizer.

Training reads it before touching a shard and stops with a clear message when the corpus does not fit the
model (:func:`check_manifest`), instead of failing later with an index error deep inside an embedding.
"""

from __future__ import annotations

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


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and validate a corpus manifest from a corpus directory or the manifest file itself."""
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
    return manifest


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
