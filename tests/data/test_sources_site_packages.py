"""The `site-packages` source: every installed distribution's .py files, named inside their site directory."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from acomp.data.sources import Document, SourceSpec, iter_documents, resolve_files, site_packages_files


def test_site_packages_lists_installed_sources_by_their_import_path():
    files = site_packages_files()
    names = [name for name, _ in files]
    assert names == sorted(set(names)) and all(n.endswith(".py") and ".." not in n for n in names)
    by_name = dict(files)
    assert by_name["torch/__init__.py"] == Path(torch.__file__).resolve()
    assert not any(n.startswith("acomp/") for n in names)  # the editable checkout is not an installed package

    spec = SourceSpec("site-packages")
    resolved = resolve_files(spec)
    docs = [d for d in itertools.islice(iter_documents(spec, resolved), 20) if isinstance(d, Document)]
    assert docs and all(d.domain == "site-packages" and d.doc_id in by_name for d in docs)
    assert docs[0].text == Path(docs[0].path).read_text(encoding="utf-8", errors="replace")
