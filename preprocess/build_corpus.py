#!/usr/bin/env python
"""Build a tokenized block corpus (MDS shards + manifest) from raw text, offline, before training.

Examples:
    # the embedded demo corpus: stdlib sources, a 2,048-token BPE trained on them, 512-token blocks
    python preprocess/build_corpus.py --source stdlib --train-tokenizer 2048 --block-size 512 \\
        --limit-docs 300 --out data/stdlib-512

    # the paper's 6K OPT corpus (Pile domains; paths come from $PILE_DIR or --domain-source)
    python preprocess/build_corpus.py --recipe 6k --tokenizer /models/opt-2.7b --out data/pile-6k

Every flag is documented in docs/DATA.md. The work is done by ``acomp.data.build_corpus``.
Exit status: 0 built or up to date; 2 bad input or options (before anything is written where possible);
1 a failed write (disk full, quota, file size limit: one line naming the file and the free space).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

try:
    import acomp.data  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acomp.cli import positive_int  # noqa: E402
from acomp.data import RemoteError, SourceFormatError, build_corpus, upload_corpus  # noqa: E402
from acomp.data.remote import stage_dir  # noqa: E402

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def _recipe_path(value: str) -> str:
    """``6k`` -> preprocess/recipes/6k.yaml; a path is kept as is."""
    path = Path(value)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return value
    candidate = RECIPES_DIR / f"{value}.yaml"
    if candidate.exists():
        return str(candidate)
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise argparse.ArgumentTypeError(f"no recipe {value!r} (a path, or one of {known})")


def _domain_source(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--domain-source expects NAME=PATH, got {value!r}")
    return name, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("Every flag")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_argument_group("what to read")
    what.add_argument(
        "--source",
        action="append",
        metavar="SRC",
        help="'stdlib', 'site-packages', a .jsonl[.gz|.zst]/.parquet/.txt file, a directory, a save_to_disk "
        "dataset dir, or a glob; repeatable (default: stdlib when no --recipe)",
    )
    what.add_argument(
        "--recipe", type=_recipe_path, help="recipe YAML, or a name in preprocess/recipes (6k, 6k-llama, 30k)"
    )
    what.add_argument(
        "--domain-source",
        action="append",
        type=_domain_source,
        metavar="NAME=PATH",
        default=[],
        help="with --recipe: read domain NAME from PATH instead of the recipe's source",
    )
    what.add_argument(
        "--text-field",
        default="text",
        help="record field holding the text, dotted for nested (default: text)",
    )
    what.add_argument(
        "--domain-field", help="record field naming each record's domain (e.g. meta.pile_set_name)"
    )
    what.add_argument("--id-field", help="record field used as doc_id (default: file:line or file#row)")
    what.add_argument(
        "--domain", help="domain name for every document of --source (default: from the source)"
    )
    tok = p.add_argument_group("tokenizer (exactly one, unless the recipe names one)")
    tok.add_argument("--tokenizer", metavar="TOK", help="AutoTokenizer name or local path")
    tok.add_argument(
        "--train-tokenizer",
        type=positive_int,
        metavar="VOCAB",
        help="train a byte-level BPE with VOCAB tokens on the training split and save it",
    )
    tok.add_argument(
        "--tokenizer-train-chars",
        type=positive_int,
        default=500_000_000,
        help="with --train-tokenizer: train on at most this many characters (default: 500M)",
    )
    shape = p.add_argument_group("corpus shape")
    shape.add_argument(
        "--block-size", type=positive_int, help="tokens per block (default: recipe's, else 6144)"
    )
    shape.add_argument(
        "--limit-docs", type=positive_int, metavar="N", help="read at most N documents per source"
    )
    shape.add_argument("--max-tokens", metavar="N", help="cap training tokens per domain (e.g. 5M, 0.5B)")
    shape.add_argument(
        "--val-fraction",
        type=float,
        help="fraction of documents held out for val (default: recipe's, else 0.05)",
    )
    shape.add_argument("--val-tokens", metavar="N", help="cap validation tokens per domain")
    shape.add_argument(
        "--seed", type=int, help="seed of the train/val assignment (default: recipe's, else 0)"
    )
    output = p.add_argument_group("output")
    output.add_argument(
        "--out",
        required=True,
        help="output corpus directory, or s3://bucket/prefix (built in --stage, then uploaded)",
    )
    output.add_argument(
        "--stage",
        help="with an s3:// --out: where to build first (default: $TMPDIR/acomp-corpus-stage/<hash>)",
    )
    output.add_argument(
        "--overwrite", action="store_true", help="replace a different corpus already at --out"
    )
    output.add_argument(
        "--compression", default="none", help="shard compression: none (default), zstd[:LEVEL], br, bz2"
    )
    output.add_argument(
        "--shard-size", default="64mb", help="shard size limit before compression (default: 64mb)"
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--num-workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="tokenizer processes, 1 = in this process (default: all cores); the output is the same for any value",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or info logs (the closing summary is still printed)",
    )
    return p


def _summary(manifest: dict, out: str) -> str:
    rows = [
        f"corpus at {out}: block_size {manifest['block_size']}, vocab {manifest['vocab_size']} "
        f"({manifest['dtype']}), tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}"
    ]
    header = (
        f"{'split':6} {'domain':20} {'blocks':>9} {'tokens':>13} {'docs':>8} {'short':>7} {'remainder':>11}"
    )
    rows.append(header)
    for split, info in manifest["splits"].items():
        for domain, c in info["domains"].items():
            rows.append(
                f"{split:6} {domain[:20]:20} {c['blocks']:>9,} {c['tokens']:>13,} {c['docs']:>8,} "
                f"{c['dropped_short_docs']:>7,} {c['dropped_remainder_tokens']:>11,}"
            )
    info = manifest["input"]
    rows.append(
        f"input: {info['documents']:,} documents, {info['replaced_sequences']:,} invalid UTF-8 sequences replaced, "
        f"{len(info['empty_files'])} empty and {len(info['unreadable_files'])} unreadable files, "
        f"{len(info.get('skipped_files', []))} skipped (not regular files, dangling links, duplicates)"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    argv_used = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in ["python", "preprocess/build_corpus.py", *argv_used])
    # A remote --out is built locally first (kept, so a rerun finds it up to date), then uploaded manifest last.
    out = (args.stage or str(stage_dir(args.out))) if "://" in args.out else args.out
    try:
        manifest = build_corpus(
            source=args.source,
            out=out,
            tokenizer=args.tokenizer,
            train_tokenizer_vocab=args.train_tokenizer,
            tokenizer_train_chars=args.tokenizer_train_chars,
            block_size=args.block_size,
            recipe=args.recipe,
            domain_sources=dict(args.domain_source) or None,
            domain=args.domain,
            text_field=args.text_field,
            domain_field=args.domain_field,
            id_field=args.id_field,
            limit_docs=args.limit_docs,
            max_tokens=args.max_tokens,
            val_fraction=args.val_fraction,
            val_tokens=args.val_tokens,
            seed=args.seed,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            compression=args.compression,
            shard_size=args.shard_size,
            progress=not args.quiet,
            command=command,
        )
        if out != args.out:
            upload_corpus(
                out, args.out, overwrite=args.overwrite, log=(lambda line: None) if args.quiet else print
            )
    except RemoteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError, SourceFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # CorpusWriteError (disk full, quota, ulimit -f) and other I/O failures
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(_summary(manifest, args.out))
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the partial build directory is removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
