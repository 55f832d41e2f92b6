"""Build a tokenized corpus: documents -> token ids -> whole blocks -> MDS shards + manifest.

This is the in-process entry point (:func:`build_corpus`); ``preprocess/build_corpus.py`` is a thin CLI around
it. The output depends only on the inputs and options, never on ``num_workers``: documents are read in a fixed
order, tokenized in parallel but consumed in order, assigned to train/val by a hash of their id, and written by
one writer per split.

A build writes into a locked hidden directory beside ``out`` and swaps it in at the end (:mod:`.workdir`);
what a killed build left there is removed by the next one. An existing corpus is reused only when its
inputs are the same (options, source listing, the sha256 of every source file read, the given tokenizer)
and its files are intact (manifest against indexes and tokenizer, every shard against its xxh64); a
damaged one is rebuilt.

Layout written under ``out``::

    manifest.json      counts per split and domain, tokenizer identity, sources and checksums, command
    tokenizer/         loads with transformers.AutoTokenizer.from_pretrained (always written)
    train/, val/       MDS datasets (index.json + shard.NNNNN.mds[.zstd]); columns input_ids, domain,
                       doc_id, block_index
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress, draws_bars
from .blocks import SHARD_HASHES, BlockWriter, Counts, corpus_columns, normalize_compression, smallest_dtype
from .encode import Encoder, serial_tokenizers
from .manifest import FORMAT_VERSION, MANIFEST_NAME, check_consistency, corpus_id, write_manifest
from .plan import SPLITS, BuildPlan, make_plan
from .recipe import Recipe, parse_count
from .sources import Document, SourceIssue, source_fingerprint
from .tokenizer import (
    backend_json,
    load_tokenizer,
    register_control_tokens,
    special_tokens,
    tokenizer_sha256,
    train_bpe_tokenizer,
)
from .workdir import WRITE_ERRNOS, BuildDir, CorpusWriteError, clean_leftovers, free_space

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER_TRAIN_CHARS = 500_000_000
_CHUNK_CHARS = 1 << 18
_CHUNK_DOCS = 256
# Fault injection for tests/faults/: pause this many seconds once the tokenizer workers run (a window to kill
# the build); prints "fault injection: build paused" with the pids. Never set outside tests.
FAULT_PAUSE = "ACOMP_FAULT_BUILD_PAUSE_S"


def _training_texts(plan: BuildPlan, max_chars: int, seen: list[int]) -> Iterator[str]:
    """Train-split texts for tokenizer training: an equal character share per source, in reading order.
    ``seen`` counts [documents, characters] given."""
    share = max(1, max_chars // len(plan.sources))
    for index in range(len(plan.sources)):
        used = 0
        for item in plan.documents(index):
            if not isinstance(item, Document):
                continue
            budget = plan.budget(item.domain)
            if budget.split_for(item.doc_id, item.domain, plan.seed, plan.val_fraction) != "train":
                continue
            yield item.text
            used += len(item.text)
            seen[0] += 1
            seen[1] += len(item.text)
            if used >= share:
                break


def _chunks(items: Iterable[Document | SourceIssue], stop: list[bool]) -> Iterator[tuple[list, list[str]]]:
    """Group items into chunks of about _CHUNK_CHARS characters for the workers."""
    batch: list[Document | SourceIssue] = []
    texts: list[str] = []
    chars = 0
    for item in items:
        if stop[0]:
            break
        batch.append(item)
        if isinstance(item, Document):
            texts.append(item.text)
            chars += len(item.text)
            if chars >= _CHUNK_CHARS or len(texts) >= _CHUNK_DOCS:
                yield batch, texts
                batch, texts, chars = [], [], 0
    if batch:
        yield batch, texts


def _fault_pause(encoder: Encoder, where: Path) -> None:
    seconds = float(os.environ.get(FAULT_PAUSE) or 0)
    if seconds > 0:
        print(
            f"fault injection: build paused (pid {os.getpid()}, workers {encoder.worker_pids()}, in {where})",
            flush=True,
        )
        time.sleep(seconds)


def _write_all(plan: BuildPlan, encoder: Encoder, sink: BlockWriter, progress: bool, where: Path) -> None:
    """Read every source in order, tokenize in parallel, and hand documents to the writer in order."""
    total = plan.limit_docs * len(plan.sources) if plan.limit_docs else None
    bar = Progress(total, "tokenize", "doc", enabled=progress)
    paused = False
    done = 0  # documents handed to the writer since the last update
    try:
        for index, spec in enumerate(plan.sources):
            # The source's one domain, named or not (None: a record field names each document's)
            domain = spec.domain or (None if spec.domain_field else spec.default_domain())
            if domain and sink.domain_done(domain):
                continue
            stop = [False]
            chunks = encoder.map(_chunks(plan.documents(index), stop))
            try:
                for items, ids_list in chunks:
                    if not paused:
                        _fault_pause(encoder, where)
                        paused = True
                    ids_iter = iter(ids_list)
                    for item in items:
                        if isinstance(item, SourceIssue):
                            sink.issue(index, item)
                            continue
                        if domain and sink.domain_done(domain):
                            stop[0] = True
                            break
                        sink.add(index, item, next(ids_iter))
                        done += 1
                    if stop[0]:
                        break
                    blocks = sum(c.blocks for split in sink.counts.values() for c in split.values())
                    bar.update(done, blocks=blocks)
                    done = 0
            finally:
                chunks.close()
    finally:
        bar.update(done)
        bar.close()


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _source_records(plan: BuildPlan, sink: BlockWriter, progress: bool) -> list[dict[str, Any]]:
    """Per source: its spec and the files actually read, with size and sha256."""
    records = []
    paths = [Path(p) for files in sink.files.values() for p in files]
    bar = Progress(len(paths), "checksum", "file", enabled=progress and bool(paths))
    for index, spec in enumerate(plan.sources):
        root = plan.files(index).root
        files = []
        for name in sink.files.get(str(index), []):
            path = Path(name)
            targets = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for target in targets:
                try:
                    digest, size = _sha256(target), target.stat().st_size
                except OSError as err:
                    digest, size = f"unreadable: {err}", -1
                files.append({"path": os.path.relpath(target, root), "bytes": size, "sha256": digest})
            bar.update(1)
        records.append({"spec": asdict(spec), "root": str(root), "files": files})
    bar.close()
    return records


def _summaries(plan: BuildPlan, sink: BlockWriter, shards: dict[str, int]) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split in SPLITS:
        total = Counts()
        domains = {}
        for domain in sorted(sink.counts[split]):
            counts = sink.counts[split][domain]
            total.add(counts)
            budget = getattr(plan.budget(domain), split)
            domains[domain] = {**asdict(counts), "budget_blocks": budget}
        splits[split] = {**asdict(total), "shards": shards[split], "domains": domains}
    return splits


def _fingerprint(
    plan: BuildPlan, tokenizer: str | None, options: dict[str, Any], read: list[list[dict]] | None
) -> str:
    """Hash of the options, every source file's name and size, the sha256 of every file read (``read``: per
    source, the manifest's ``sources[i].files``) and the given tokenizer directory's file names and sizes:
    equal means 'same inputs'. Content hashes catch a same-size edit that kept its mtime. ``read=None`` gives
    the fingerprint of manifests without a ``corpus_id`` (older acomp), which had no content hashes."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for index, spec in enumerate(plan.sources):
        h.update(json.dumps(source_fingerprint(spec, plan.files(index))).encode())
        if read is not None:
            h.update(json.dumps([[f["path"], f["sha256"]] for f in read[index]]).encode())
    if tokenizer and Path(tokenizer).is_dir():
        for p in sorted(Path(tokenizer).rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(tokenizer)}:{p.stat().st_size}".encode())
    return h.hexdigest()


def _reread(plan: BuildPlan, manifest: dict[str, Any]) -> list[list[dict]]:
    """The manifest's record of the source files read, with each file's sha256 computed again now."""
    read = []
    for index, record in enumerate(manifest.get("sources") or []):
        if index >= len(plan.sources):
            break
        root = plan.files(index).root
        files = []
        for f in record.get("files", []):
            try:
                digest = _sha256(root / f["path"])
            except OSError as err:
                digest = f"unreadable: {err}"
            files.append({**f, "sha256": digest})
        read.append(files)
    return read + [[] for _ in range(len(plan.sources) - len(read))]


def _changed_inputs(
    plan: BuildPlan, tokenizer: str | None, options: dict[str, Any], manifest: dict[str, Any]
) -> str | None:
    """Why the inputs differ from the manifest's record of them, None when they are the same (the options
    were found equal already)."""
    read = _reread(plan, manifest)
    for index, record in enumerate(manifest.get("sources") or []):
        for old, new in zip(record.get("files", []), read[index] if index < len(read) else []):
            if old.get("sha256") != new["sha256"]:
                return f"source file {record.get('root')}/{old['path']} changed since the build (its sha256 differs)"
    legacy = "corpus_id" not in manifest  # its recorded sha256s were compared above
    if manifest.get("fingerprint") != _fingerprint(plan, tokenizer, options, None if legacy else read):
        return (
            "same options, but the source files changed (files added, removed or resized, or the tokenizer's)"
        )
    if tokenizer is not None and _given_tokenizer_sha256(tokenizer) != (manifest.get("tokenizer") or {}).get(
        "sha256"
    ):
        return f"same options and sources, but the tokenizer {tokenizer} changed (its sha256 differs)"
    return None


def _damage(out: Path, manifest: dict[str, Any]) -> str | None:
    """What is wrong with the corpus files at ``out`` (None when intact): the manifest against the split
    indexes and the tokenizer, every shard against its recorded size and xxh64, the tokenizer's identity."""
    from .dataset import verify_shards

    try:
        check_consistency(manifest, out, require=True)
        for split in manifest["splits"]:
            verify_shards(out / split, "hash")
        if tokenizer_sha256(load_tokenizer(out / "tokenizer")) != (manifest["tokenizer"] or {}).get("sha256"):
            return f"{out / 'tokenizer'} is not the tokenizer the manifest records (its sha256 differs)"
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        return str(err)
    return None


def _existing_corpus(
    out: Path, plan: BuildPlan, tokenizer: str | None, options: dict[str, Any], overwrite: bool
) -> dict | None:
    """The manifest of an identical, intact corpus already at ``out`` (None: build); raise if ``out`` holds
    anything else. A damaged copy of the same corpus is rebuilt (logged)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if not any(out.iterdir()) or overwrite:
        return None
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
    except FileNotFoundError:
        raise FileExistsError(
            f"output dir {out} is not empty and holds no corpus manifest; refusing to write there "
            f"(pass --overwrite / overwrite=True to replace its contents, or choose another --out)"
        ) from None
    except (OSError, ValueError) as err:
        raise FileExistsError(
            f"output dir {out} holds an unreadable manifest ({err}); pass --overwrite to replace it"
        ) from None
    old = manifest.get("options", {})
    old = old if isinstance(old, dict) else {}
    canonical = json.loads(json.dumps(options, default=str))
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in canonical.items() if old.get(k) != v]
    detail = "; ".join(diffs[:5]) if diffs else _changed_inputs(plan, tokenizer, options, manifest)
    if detail is not None:
        raise FileExistsError(
            f"output dir {out} already holds a different corpus ({detail}); pass --overwrite / overwrite=True "
            f"to replace it, or choose another --out"
        )
    damage = _damage(out, manifest)
    if damage is None:
        return manifest
    log.warning("corpus at %s is damaged (%s); building it again", out, damage)
    return None


def _given_tokenizer_sha256(tokenizer: str) -> str:
    tok = load_tokenizer(tokenizer)
    register_control_tokens(tok)
    return tokenizer_sha256(tok)


def _versions() -> dict[str, str]:
    import streaming
    import tokenizers
    import transformers

    return {
        "streaming": streaming.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def build_corpus(
    source: str | Sequence[str] | None = None,
    out: str | Path = "data/stdlib",
    *,
    tokenizer: str | None = None,
    train_tokenizer_vocab: int | None = None,
    block_size: int | None = None,
    recipe: str | Path | Recipe | None = None,
    domain_sources: dict[str, str] | None = None,
    domain: str | None = None,
    text_field: str = "text",
    domain_field: str | None = None,
    id_field: str | None = None,
    limit_docs: int | None = None,
    max_tokens: int | str | None = None,
    val_fraction: float | None = None,
    val_tokens: int | str | None = None,
    seed: int | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
    compression: str | None = None,
    shard_size: int | str = "64mb",
    tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Build (or reuse, when identical) a tokenized block corpus at ``out``; returns its manifest.

    ``source`` is ``"stdlib"`` (the default without a recipe), a path/glob, or a list of them; ``recipe`` a
    recipe YAML instead. Exactly one of ``tokenizer`` (AutoTokenizer name or local path) and
    ``train_tokenizer_vocab`` (train a byte-level BPE of that size) unless the recipe names a tokenizer.
    ``limit_docs`` caps the documents read per source; ``max_tokens`` the training tokens per domain.
    Every option is described in docs/DATA.md.
    """
    if "://" in str(out):  # else a local directory named "s3:/bucket/..." would be built
        raise ValueError(
            f"out={str(out)!r}: build_corpus writes a local directory; build into one and publish it with "
            "upload_corpus (preprocess/build_corpus.py --out URI does both)"
        )
    plan, rec = make_plan(
        source=source,
        recipe=recipe,
        domain_sources=domain_sources,
        domain=domain,
        text_field=text_field,
        domain_field=domain_field,
        id_field=id_field,
        block_size=block_size,
        limit_docs=limit_docs,
        max_tokens=max_tokens,
        val_fraction=val_fraction,
        val_tokens=val_tokens,
        seed=seed,
    )
    if tokenizer is None and train_tokenizer_vocab is None and rec is not None:
        tokenizer = rec.tokenizer
    if (tokenizer is None) == (train_tokenizer_vocab is None):
        raise ValueError(
            "give exactly one of tokenizer (a name or local path) and train_tokenizer_vocab "
            f"(got tokenizer={tokenizer!r}, train_tokenizer_vocab={train_tokenizer_vocab!r})"
        )
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if train_tokenizer_vocab is not None and plan.val_fraction >= 1.0:
        raise ValueError(
            f"val_fraction={plan.val_fraction} puts every document in the val split, which leaves "
            f"train_tokenizer_vocab={train_tokenizer_vocab} (--train-tokenizer) no training text; give "
            f"--tokenizer, or a val_fraction below 1"
        )
    from streaming.base.util import bytes_to_int

    options = {
        "sources": [asdict(s) for s in plan.sources],
        "recipe": plan.recipe,
        "block_size": plan.block_size,
        "tokenizer": tokenizer,
        "train_tokenizer_vocab": train_tokenizer_vocab,
        "tokenizer_train_chars": tokenizer_train_chars if train_tokenizer_vocab else None,
        "limit_docs": limit_docs,
        "max_tokens": parse_count(max_tokens, "max_tokens"),
        "val_fraction": plan.val_fraction,
        "val_tokens": parse_count(val_tokens, "val_tokens"),
        "seed": plan.seed,
        "budgets": {k: asdict(v) for k, v in plan.budgets.items()} or {"*": asdict(plan.default_budget)},
        "compression": normalize_compression(compression),
        "shard_size": bytes_to_int(shard_size),
    }
    out = Path(out)
    clean_leftovers(out)
    existing = _existing_corpus(out, plan, tokenizer, options, overwrite)
    if existing is not None:
        log.info("corpus at %s is up to date (same options and sources, files intact); nothing to do", out)
        return existing

    build: BuildDir | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        build = BuildDir(out)
        tmp = build.path
        tok, tokenizer_info = _obtain_tokenizer(
            plan, tokenizer, train_tokenizer_vocab, tokenizer_train_chars, progress
        )
        tok.save_pretrained(str(tmp / "tokenizer"))
        dtype = smallest_dtype(len(tok))
        sink = _write_splits(plan, tok, dtype, tmp, options, num_workers, progress)
        manifest = _manifest(plan, tok, tokenizer_info, dtype, sink, tmp, options, progress)
        read = [record["files"] for record in manifest["sources"]]
        manifest.update(
            fingerprint=_fingerprint(plan, tokenizer, options, read),
            command=command or _describe_call(source, out, num_workers, options),
        )
        for warning in manifest["warnings"]:
            log.warning("%s: %s", out, warning)
        write_manifest(manifest, tmp)
        build.install()
    except BaseException as err:
        failure = err
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS and not isinstance(err, CorpusWriteError):
            failure = _write_error(err, build, out)
        if build is not None:
            build.discard()
        if failure is not err:
            raise failure from err
        raise
    return manifest


def _write_error(err: OSError, build: BuildDir | None, out: Path) -> CorpusWriteError:
    """One line: the file being written, the cause, the free space and a file size limit if one is set."""
    where = err.filename or (build.newest_file() if build else None) or out.parent
    kept = "the corpus already there is untouched" if out.exists() else "nothing was installed there"
    error = CorpusWriteError(
        f"could not write {where} while building {out}: {err.strerror} ({free_space(out.parent)}; disk full, "
        f"quota or I/O error?); the partial build was removed and {kept}"
    )
    error.errno = err.errno
    return error


def _obtain_tokenizer(
    plan: BuildPlan, tokenizer: str | None, vocab: int | None, max_chars: int, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """The given tokenizer, or a BPE trained on the training split; control tokens registered."""
    if vocab is not None:
        seen = [0, 0]
        # the tokenizers trainer draws its own bar: only where bars can be drawn (a log file gets blank lines)
        bar = progress and draws_bars(sys.stderr)
        tok = train_bpe_tokenizer(_training_texts(plan, max_chars, seen), vocab, show_progress=bar)
        if len(tok) < vocab:
            raise ValueError(
                f"train_tokenizer_vocab={vocab}: the trained tokenizer has only {len(tok)} tokens, because the "
                f"training text is too small ({seen[1]:,} characters in {seen[0]} documents of the train "
                f"split); give more documents (--limit-docs, --val-fraction), a smaller --train-tokenizer, "
                f"or --tokenizer"
            )
        info: dict[str, Any] = {
            "name_or_path": None,
            "trained": {
                "type": "byte-level BPE",
                "vocab_size": vocab,
                "max_train_chars": max_chars,
                "min_frequency": 2,
            },
        }
    else:
        tok = load_tokenizer(tokenizer)
        info = {"name_or_path": str(tokenizer), "trained": None}
    register_control_tokens(tok)
    info.update(path="tokenizer", sha256=tokenizer_sha256(tok), cls=type(tok).__name__)
    return tok, info


def _write_splits(
    plan: BuildPlan,
    tok: Any,
    dtype: str,
    tmp: Path,
    options: dict[str, Any],
    num_workers: int,
    progress: bool,
) -> BlockWriter:
    """Tokenize every source and write the train/val MDS splits under ``tmp``."""
    from streaming import MDSWriter

    columns = corpus_columns(dtype, plan.block_size)
    writers = {
        split: MDSWriter(
            out=str(tmp / split),
            columns=columns,
            compression=options["compression"],
            hashes=SHARD_HASHES,
            size_limit=options["shard_size"],
        )
        for split in SPLITS
    }
    sink = BlockWriter(plan, writers)
    with serial_tokenizers(), Encoder(backend_json(tok), dtype, num_workers) as encoder:
        try:
            _write_all(plan, encoder, sink, progress, tmp)
        except BaseException:
            for writer in writers.values():
                writer.cancel_future_jobs()  # no final flush: it would fail again, hiding the first error
            raise
        for writer in writers.values():
            writer.finish()
    return sink


def _manifest(
    plan: BuildPlan,
    tok: Any,
    tokenizer_info: dict,
    dtype: str,
    sink: BlockWriter,
    tmp: Path,
    options: dict,
    progress: bool,
) -> dict[str, Any]:
    """The manifest of a finished build (raises when no block was written at all)."""
    shards = {s: len(json.loads((tmp / s / "index.json").read_text())["shards"]) for s in SPLITS}
    splits = _summaries(plan, sink, shards)
    if splits["train"]["blocks"] == 0 and splits["val"]["blocks"] == 0:
        short = splits["train"]["dropped_short_docs"] + splits["val"]["dropped_short_docs"]
        raise ValueError(
            f"no blocks were written: {sink.documents} documents read, {short} shorter than "
            f"block_size={plan.block_size} tokens; use longer documents, a smaller --block-size, or a larger "
            f"--limit-docs"
        )
    warnings = []
    if splits["val"]["blocks"] == 0 and plan.val_fraction > 0:
        warnings.append("split 'val' is empty: too few documents for val_fraction; raise --limit-docs")
    if splits["train"]["blocks"] == 0 and plan.val_fraction < 1:
        warnings.append("split 'train' is empty")
    skipped = [issue for index in range(len(plan.sources)) for issue in plan.files(index).skipped]
    if skipped:
        shown = "; ".join(f"{i.path}: {i.detail}" for i in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.append(
            f"skipped {len(skipped)} source entries that are not readable regular files or were reached twice "
            f"(input.skipped_files): {shown}{more}"
        )
    names, ids = special_tokens(tok)
    issues = sink.issues
    manifest = {
        "format_version": FORMAT_VERSION,
        "block_size": plan.block_size,
        "vocab_size": len(tok),
        "dtype": dtype,
        "columns": corpus_columns(dtype, plan.block_size),
        "compression": options["compression"],
        "shard_hashes": SHARD_HASHES,
        "tokenizer": tokenizer_info,
        "special_tokens": names,
        "special_token_ids": ids,
        "splits": splits,
        "input": {
            "documents": sink.documents,
            "replaced_sequences": sink.replaced_sequences,
            "docs_with_replacements": sink.replaced_docs,
            "empty_files": [i["path"] for i in issues if i["kind"] == "empty"],
            "unreadable_files": [
                {"path": i["path"], "error": i["detail"]} for i in issues if i["kind"] == "unreadable"
            ],
            "skipped_files": [{"path": i.path, "reason": i.detail} for i in skipped],
        },
        "sources": _source_records(plan, sink, progress),
        "recipe": plan.recipe,
        "options": options,
        "versions": _versions(),
        "warnings": warnings,
    }
    manifest["corpus_id"] = corpus_id(
        manifest, {split: (tmp / split / "index.json").read_bytes() for split in SPLITS}
    )
    return manifest


def _describe_call(source: Any, out: Path, num_workers: int, options: dict[str, Any]) -> str:
    shown = {k: v for k, v in options.items() if v is not None and k not in ("sources", "budgets")}
    args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
    return f"build_corpus(source={source!r}, out={str(out)!r}, {args}, num_workers={num_workers})"
