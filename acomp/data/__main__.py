"""Corpus commands: ``python -m acomp.data upload LOCAL_DIR s3://bucket/prefix [--overwrite] [--quiet]``.

``upload`` publishes a corpus built by ``preprocess/build_corpus.py`` to an S3-compatible object store:
shards checked against their index first, then the tokenizer, shards and indexes, and ``manifest.json``
last, so that an interrupted upload is never read as a complete corpus (run it again). Credentials and the
endpoint come from the environment as for training (docs/DATA.md, "Remote corpora"). Exit status 2 with one
``error: ...`` line on bad input or a refusal by the store.
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m acomp.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = p.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upload", help="upload a built corpus directory to s3://bucket/prefix")
    up.add_argument("local", help="corpus directory (manifest.json, tokenizer/, train/, val/)")
    up.add_argument("uri", help="destination, s3://bucket/prefix")
    up.add_argument(
        "--overwrite", action="store_true", help="replace another corpus already at the destination"
    )
    up.add_argument("--quiet", action="store_true", help="print only errors and the final line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from acomp.data import CorruptShardError, RemoteError, upload_corpus

    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    try:
        count = upload_corpus(args.local, args.uri, overwrite=args.overwrite, log=log)
    except (RemoteError, CorruptShardError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"uploaded {count} files: {args.local} -> {args.uri}" if count else f"{args.uri} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
