"""Raw-text sources: every supported kind yields documents in one fixed order, so builds are reproducible.

Supported sources (one string each):

- ``stdlib``: this interpreter's standard-library ``.py`` files (always present offline; real long documents).
- ``site-packages``: the ``.py`` files of every installed distribution (``importlib.metadata``), named by
  their path inside their site directory (``torch/nn/functional.py``); the larger offline corpus.
- a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` file: one JSON object per line with a text field.
- a ``.parquet`` file with a text column.
- a ``.txt`` file (one document).
- a directory saved with ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``).
- any other directory: every supported file below it, sorted by relative path (``.txt`` files are one
  document each).
- a glob (``/data/pile/*.jsonl.zst``), expanded and sorted.

Bad bytes never stop a build: invalid UTF-8 is replaced by U+FFFD and counted, and a file that cannot be
opened or ends early (truncated ``.gz``/``.zst``) is reported as a :class:`SourceIssue` in the stream.
Listing a directory follows symlinks, reads a directory or file reached twice (a symlink cycle, two links to
one place) once, and never opens what is not a regular file: FIFOs, sockets, devices and dangling or looping
links are skipped and reported (:attr:`SourceListing.skipped`).
Structural errors (a record without the text field, a line that is not JSON) raise
:class:`SourceFormatError` naming the file and line, because guessing there would silently corrupt data.
"""

from __future__ import annotations

import errno
import functools
import glob
import gzip
import io
import json
import os
import stat
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_REPLACEMENT_UTF8 = "\ufffd".encode()
STDLIB, SITE_PACKAGES = "stdlib", "site-packages"
EMBEDDED_SOURCES = (STDLIB, SITE_PACKAGES)  # source names that are not paths


class SourceFormatError(ValueError):
    """A source record is malformed (missing text field, not JSON, wrong type); names file and line."""


@dataclass(frozen=True)
class SourceSpec:
    """Where to read documents and how to label them.

    ``domain`` names every document of this source. With ``domain_field`` set and ``domain`` unset, each
    record's own field (dotted path, e.g. ``meta.pile_set_name``) names its domain. With ``match`` set, only
    records whose ``domain_field`` equals ``match`` are kept (e.g. one Pile subset out of mixed files).
    """

    path: str
    domain: str | None = None
    text_field: str = "text"
    domain_field: str | None = None
    match: str | None = None
    id_field: str | None = None

    def default_domain(self) -> str:
        """The domain name used when neither ``domain`` nor a record field gives one."""
        if self.domain:
            return self.domain
        if self.path in EMBEDDED_SOURCES:
            return self.path
        path = Path(self.path.rstrip("/"))
        while _is_glob(path.name) and path.parent != path:  # /data/pile/train/*.jsonl.zst -> train
            path = path.parent
        name = path.name
        for suffix in sorted(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES, key=len, reverse=True):
            if name.endswith(suffix):
                return name[: -len(suffix)] or "default"
        return name or "default"


@dataclass(frozen=True)
class Document:
    """One document: its text, domain, stable id, the file it came from and how many bytes were bad."""

    text: str
    domain: str
    doc_id: str
    path: str
    replaced: int = 0


@dataclass(frozen=True)
class SourceIssue:
    """A file that was empty, could not be (fully) read, or was skipped when listing the source (not a
    regular file, a dangling link, a second path to a file already listed); counted in the manifest, never
    fatal."""

    path: str
    kind: str  # "empty", "unreadable" or "skipped"
    detail: str = ""


@dataclass(frozen=True)
class SourceListing:
    """A source's root, its files in reading order, and the entries skipped while listing it."""

    root: Path
    files: list[Path]
    skipped: list[SourceIssue] = field(default_factory=list)


def stdlib_root() -> Path:
    """The standard library's source directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def site_packages_files() -> list[tuple[str, Path]]:
    """(name inside its site directory, absolute path) of every installed distribution's ``.py`` file,
    sorted by name. Installed means in the interpreter's site directories, not anywhere on ``sys.path``:
    importing setuptools puts its ``_vendor`` directory (with dist-infos) on the path, and the listing must
    not change within a process. A name present in several site directories is taken from the first (the
    one ``import`` would load); files under the stdlib, outside the site directory (``../bin``) or missing
    on disk are skipped, and so are development checkouts (a directory with a pyproject.toml, setup.py or
    setup.cfg: an editable project is not an installed package)."""
    from importlib import metadata

    stdlib = stdlib_root().resolve()
    found: dict[str, Path] = {}
    for dist in metadata.distributions(path=site_directories()):
        base = Path(dist.locate_file("")).resolve()
        if base == stdlib or stdlib in base.parents or _is_checkout(base):
            continue
        for entry in dist.files or ():
            name = entry.as_posix()
            if not name.endswith(".py") or ".." in entry.parts or "__pycache__" in entry.parts:
                continue
            path = base / entry
            if name not in found and path.is_file():
                found[name] = path
    return sorted(found.items())


def site_directories() -> list[str]:
    """The interpreter's site-packages directories (a virtual environment's own), user site included, in
    sys.path order."""
    import site

    dirs = [*getattr(site, "getsitepackages", lambda: [])()]
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user and Path(user).is_dir():
        dirs.append(user)
    rank = {entry: i for i, entry in enumerate(sys.path)}
    return sorted(dict.fromkeys(dirs), key=lambda d: rank.get(d, len(rank)))


def _is_checkout(path: Path) -> bool:
    return any((path / marker).is_file() for marker in ("pyproject.toml", "setup.py", "setup.cfg"))


@functools.lru_cache(maxsize=1)
def _site_names() -> dict[str, str]:
    """path -> name of site_packages_files(), listed once per process (the listing reads every RECORD)."""
    return {str(path): name for name, path in site_packages_files()}


def source_name(spec: SourceSpec, root: Path, path: Path) -> str:
    """A file's stable name within its source: its path relative to the source root (for ``site-packages``
    relative to its own site directory)."""
    if spec.path == SITE_PACKAGES:
        name = _site_names().get(str(path))
        if name is not None:
            return name
    return path.relative_to(root).as_posix() if path != root else path.name


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing invalid sequences with U+FFFD; returns (text, number replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        return text, text.count("\ufffd") - data.count(_REPLACEMENT_UTF8)


def _fix_surrogates(text: str) -> tuple[str, int]:
    """JSON may escape lone surrogates (``"\\ud800"``), which no tokenizer can encode; replace them."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return fixed, fixed.count("\ufffd") - text.count("\ufffd")


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in SAVED_DATASET_MARKERS)


def _is_data_file(path: Path) -> bool:
    name = path.name
    return name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_a_file(path: str) -> str | None:
    """Why ``path`` (links followed) is neither a regular file nor a directory, or None when it is one.
    Only ``stat`` is called: a FIFO or device is never opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        try:
            return f"dangling symlink (-> {os.readlink(path)})"
        except OSError:
            return "vanished while listing"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        return f"cannot stat: {err.strerror}"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file"


def _skipped(path: str, reason: str) -> SourceIssue:
    return SourceIssue(path, "skipped", reason)


def _dedupe(candidates: list[tuple[bool, str, str, str]], skipped: list[SourceIssue]) -> list[Path]:
    """Candidates ``(reached through a link, name, path, real path)``: each real file once, under the name
    it has without links (else its first name), in name order; the other paths are reported as skipped."""
    first: dict[str, str] = {}
    kept = []
    for _, name, path, real in sorted(candidates):
        if real in first:
            skipped.append(_skipped(path, f"same file as {first[real]} (reached twice through symlinks)"))
            continue
        first[real] = name
        kept.append((name, path))
    kept.sort()
    return [Path(path) for _, path in kept]


def _walk(
    root: Path, keep: Callable[[str], bool], skip_dirs: frozenset[str] | set[str] = frozenset()
) -> SourceListing:
    """Files under ``root`` whose name passes ``keep``, sorted by relative path; pruned dirs never entered.

    Symlinks are followed, the real tree first: a symlinked directory whose target was already listed (a
    cycle, or a second link to one directory) is skipped, so the walk always ends, and a file reached by
    several paths is listed once (see :func:`_dedupe`). FIFOs, sockets, devices and dangling or looping
    links that pass ``keep`` are skipped and reported, never opened.
    """
    skipped: list[SourceIssue] = []
    candidates: list[tuple[bool, str, str, str]] = []
    real_root = os.path.realpath(root)
    listed: dict[str, str] = {real_root: "."}  # real directory -> the name it was listed under
    pending = [(str(root), "", real_root, False)]  # (path, name, real path, reached through a link)
    links: list[tuple[str, str]] = []  # symlinked directories, followed once the real tree is listed
    while pending or links:
        if not pending:
            links.sort(reverse=True)
            path, name = links.pop()
            real = os.path.realpath(path)
            if real in listed:
                skipped.append(_skipped(path, f"symlink to a directory already listed as {listed[real]}"))
            else:
                listed[real] = name
                pending.append((path, name, real, True))
            continue
        dirpath, prefix, real_dir, via_link = pending.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            skipped.append(_skipped(dirpath, f"cannot list directory: {err.strerror}"))
            continue
        for entry in entries:
            name = f"{prefix}{entry.name}"
            is_link = entry.is_symlink()
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if entry.name in skip_dirs:
                    continue
                if is_link:
                    links.append((entry.path, name + "/"))
                else:
                    real = os.path.join(real_dir, entry.name)
                    listed[real] = name + "/"
                    pending.append((entry.path, name + "/", real, via_link))
                continue
            if not keep(entry.name):
                continue
            if is_link or not entry.is_file(follow_symlinks=False):
                reason = _not_a_file(entry.path)
                if reason is not None:
                    skipped.append(_skipped(entry.path, reason))
                    continue
            real = os.path.realpath(entry.path) if is_link else os.path.join(real_dir, entry.name)
            candidates.append((via_link or is_link, name, entry.path, real))
    return SourceListing(root, _dedupe(candidates, skipped), skipped)


def resolve_files(spec: SourceSpec) -> SourceListing:
    """The source's root, its files in reading order (sorted) and the entries skipped while listing it, or a
    clear error if there are no files. A FIFO, socket, device or dangling link given as the source itself is
    an error naming it."""
    if spec.path == STDLIB:
        root = stdlib_root()
        return _walk(root, lambda name: name.endswith(".py"), skip_dirs={"site-packages", "__pycache__"})
    if spec.path == SITE_PACKAGES:
        _site_names.cache_clear()
        files = [Path(path) for path in _site_names()]
        if not files:
            raise FileNotFoundError("source 'site-packages': no installed distribution has .py files")
        return SourceListing(Path(os.path.commonpath([str(p.parent) for p in files])), files)
    if _is_glob(spec.path):
        skipped: list[SourceIssue] = []
        candidates = []
        for match in sorted(glob.glob(spec.path, recursive=True)):
            if not _is_saved_dataset(Path(match)):
                reason = _not_a_file(match)
                if reason is not None:
                    skipped.append(_skipped(match, reason))
                    continue
                if os.path.isdir(match):
                    continue
            candidates.append((os.path.islink(match), match, match, os.path.realpath(match)))
        files = _dedupe(candidates, skipped)
        if not files:
            raise FileNotFoundError(f"source glob {spec.path!r} matches no files")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        return SourceListing(root, files, skipped)
    path = Path(spec.path)
    if not path.exists():
        if path.is_symlink():
            raise FileNotFoundError(f"source {spec.path!r} is a dangling symlink (-> {os.readlink(path)})")
        raise FileNotFoundError(
            f"source {spec.path!r} does not exist (expected 'stdlib', 'site-packages', a file, a dir or a glob)"
        )
    reason = _not_a_file(str(path))
    if reason is not None:
        raise ValueError(f"source {spec.path!r} is {reason}; give a file, a directory or a glob")
    if path.is_file():
        if not _is_data_file(path):
            raise ValueError(
                f"source {spec.path!r}: unsupported file type; expected one of "
                f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)}"
            )
        return SourceListing(path.parent, [path])
    if _is_saved_dataset(path):
        return SourceListing(path, [path])
    listing = _walk(path, lambda name: name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES))
    if not listing.files:
        raise FileNotFoundError(
            f"source directory {spec.path!r} holds no .jsonl[.gz|.zst], .parquet or .txt files"
            + (
                f" ({len(listing.skipped)} skipped: {listing.skipped[0].detail}, ...)"
                if listing.skipped
                else ""
            )
        )
    return listing


def _get_field(record: Any, dotted: str) -> Any:
    """``record['a']['b']`` for ``'a.b'``; raises KeyError when any part is absent."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


class _RecordLabeler:
    """Turns a record (dict) into (text, domain, doc_id) or None when filtered out by ``match``."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.default = spec.default_domain()

    def __call__(self, record: Any, where: str, fallback_id: str) -> tuple[str, str, str] | None:
        spec = self.spec
        if not isinstance(record, dict):
            raise SourceFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        label = None
        if spec.domain_field:
            try:
                label = _get_field(record, spec.domain_field)
            except KeyError:
                label = None
            if spec.match is not None and label != spec.match:
                return None
        try:
            text = _get_field(record, spec.text_field)
        except KeyError:
            keys = sorted(record)[:20]
            raise SourceFormatError(
                f"{where}: record has no text field {spec.text_field!r} (its keys: {keys}); "
                f"pass --text-field NAME"
            ) from None
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise SourceFormatError(
                f"{where}: text field {spec.text_field!r} is a {type(text).__name__}, expected a string"
            )
        domain = spec.domain or (str(label) if label is not None else self.default)
        doc_id = fallback_id
        if spec.id_field:
            try:
                doc_id = str(_get_field(record, spec.id_field))
            except KeyError:
                raise SourceFormatError(f"{where}: record has no id field {spec.id_field!r}") from None
        return text, domain, doc_id


def _open_binary(path: Path):
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # the raw reader cannot iterate lines
    return open(path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'these bytes cannot be read' (as opposed to 'this record is malformed')."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is an install extra
        pass
    try:
        import pyarrow

        errors.append(pyarrow.ArrowException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _iter_jsonl(path: Path, rel: str, labeler: _RecordLabeler) -> Iterator[Document | SourceIssue]:
    any_line = False
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            any_line = True
            line, replaced = decode_utf8(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceFormatError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            labeled = labeler(record, f"{path}:{lineno}", f"{rel}:{lineno}")
            if labeled is None:
                continue
            text, domain, doc_id = labeled
            if "\\ud" in line or "\\uD" in line:
                text, fixed = _fix_surrogates(text)
                replaced += fixed
            yield Document(text, domain, doc_id, str(path), replaced)
    if not any_line:
        yield SourceIssue(str(path), "empty")


def _iter_parquet(path: Path, rel: str, labeler: _RecordLabeler) -> Iterator[Document | SourceIssue]:
    import pyarrow.parquet as pq

    spec = labeler.spec
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    wanted = [f.split(".")[0] for f in (spec.text_field, spec.domain_field, spec.id_field) if f]
    if spec.text_field.split(".")[0] not in names:
        raise SourceFormatError(
            f"{path}: no text column {spec.text_field!r} (columns: {names}); pass --text-field NAME"
        )
    columns = sorted({c for c in wanted if c in names})
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            labeled = labeler(record, f"{path} row {row}", f"{rel}#{row}")
            if labeled is not None:
                text, domain, doc_id = labeled
                text, replaced = _fix_surrogates(text)
                yield Document(text, domain, doc_id, str(path), replaced)
    if row == 0:
        yield SourceIssue(str(path), "empty")


def _iter_saved_dataset(path: Path, labeler: _RecordLabeler) -> Iterator[Document | SourceIssue]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = [(name, loaded[name]) for name in sorted(loaded)] if isinstance(loaded, dict) else [("", loaded)]
    spec = labeler.spec
    any_row = False
    for split, ds in parts:
        if spec.text_field.split(".")[0] not in ds.column_names:
            raise SourceFormatError(
                f"{path}{'/' + split if split else ''}: no text column {spec.text_field!r} "
                f"(columns: {ds.column_names}); pass --text-field NAME"
            )
        row = 0
        for batch in ds.iter(batch_size=1024):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                row += 1
                any_row = True
                record = dict(zip(keys, values))
                where = f"{path}{'/' + split if split else ''} row {row}"
                labeled = labeler(record, where, f"{split + '/' if split else ''}{row}")
                if labeled is not None:
                    text, domain, doc_id = labeled
                    text, replaced = _fix_surrogates(text)
                    yield Document(text, domain, doc_id, str(path), replaced)
    if not any_row:
        yield SourceIssue(str(path), "empty")


def _iter_whole_file(path: Path, rel: str, domain: str) -> Iterator[Document | SourceIssue]:
    data = path.read_bytes()
    if not data:
        yield SourceIssue(str(path), "empty")
        return
    text, replaced = decode_utf8(data)
    yield Document(text, domain, rel, str(path), replaced)


def iter_documents(
    spec: SourceSpec, resolved: SourceListing | None = None
) -> Iterator[Document | SourceIssue]:
    """Documents of one source in a fixed order, interleaved with issues about unreadable/empty files
    (entries skipped while listing are in ``resolved.skipped``, not in this stream).

    ``resolved`` is :func:`resolve_files`' answer when the caller already has it (listing a large tree twice
    is slow).
    """
    listing = resolved or resolve_files(spec)
    root, files = listing.root, listing.files
    labeler = _RecordLabeler(spec)
    read_errors = _read_errors()
    for path in files:
        rel = source_name(spec, root, path)
        try:
            if path.is_dir():
                yield from _iter_saved_dataset(path, labeler)
            elif spec.path in EMBEDDED_SOURCES or path.name.endswith(TEXT_SUFFIXES):
                yield from _iter_whole_file(path, rel, spec.default_domain())
            elif path.name.endswith(PARQUET_SUFFIXES):
                yield from _iter_parquet(path, rel, labeler)
            else:
                yield from _iter_jsonl(path, rel, labeler)
        except SourceFormatError:
            raise
        except read_errors as err:
            yield SourceIssue(str(path), "unreadable", f"{type(err).__name__}: {err}")


def source_fingerprint(spec: SourceSpec, resolved: SourceListing | None = None) -> list[tuple[str, int]]:
    """(relative path, size) of every file of a source: cheap; a same-size edit needs the content hashes."""
    listing = resolved or resolve_files(spec)
    root, files = listing.root, listing.files
    out = []
    for path in files:
        if path.is_dir():
            for sub in sorted(p for p in path.rglob("*") if p.is_file()):
                out.append((sub.relative_to(root).as_posix(), sub.stat().st_size))
        else:
            out.append((source_name(spec, root, path), path.stat().st_size))
    return out
