"""Corpus pipeline: build tokenized block corpora as MDS shards, and stream them at training time.

Build: :func:`build_corpus` (CLI: ``preprocess/build_corpus.py``). Read: :class:`CorpusDataset` and
:func:`build_dataloader`; check a corpus against a model with :func:`read_manifest` / :func:`check_manifest`.
The format, manifest fields and resumption are described in docs/DATA.md.
"""

from .blocks import corpus_columns, smallest_dtype
from .build import build_corpus
from .dataset import (
    CorpusDataset,
    CorruptShardError,
    build_dataloader,
    collate_blocks,
    default_cache_dir,
    verify_shards,
)
from .manifest import FORMAT_VERSION, MANIFEST_NAME, check_manifest, read_manifest, write_manifest
from .plan import split_of
from .recipe import DomainRecipe, Recipe, load_recipe, parse_count
from .remote import RemoteError, fetch_corpus, upload_corpus
from .sources import Document, SourceFormatError, SourceIssue, SourceSpec, iter_documents, stdlib_root
from .tokenizer import CONTROL_TOKENS, EOC_TOKEN, SUM_TOKEN

__all__ = [
    "CONTROL_TOKENS",
    "EOC_TOKEN",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SUM_TOKEN",
    "CorpusDataset",
    "CorruptShardError",
    "Document",
    "DomainRecipe",
    "Recipe",
    "RemoteError",
    "SourceFormatError",
    "SourceIssue",
    "SourceSpec",
    "build_corpus",
    "build_dataloader",
    "check_manifest",
    "collate_blocks",
    "corpus_columns",
    "default_cache_dir",
    "fetch_corpus",
    "iter_documents",
    "load_recipe",
    "parse_count",
    "read_manifest",
    "smallest_dtype",
    "split_of",
    "stdlib_root",
    "upload_corpus",
    "verify_shards",
    "write_manifest",
]
