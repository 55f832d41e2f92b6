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


def test_the_listing_does_not_change_when_a_package_puts_its_vendored_dists_on_sys_path(
    tmp_path, monkeypatch
):
    """Importing setuptools puts setuptools/_vendor (dist-infos of its vendored packages) on sys.path; a
    corpus built from `site-packages` earlier in the same process must still match (it read as 'the
    source files changed' when the quality benchmark built its corpus again after training)."""
    before = site_packages_files()
    vendored = tmp_path / "_vendor"
    (vendored / "vendored_pkg").mkdir(parents=True)
    (vendored / "vendored_pkg" / "__init__.py").write_text("x = 1\n")
    info = vendored / "vendored_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vendored-pkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("vendored_pkg/__init__.py,,\nvendored_pkg-1.0.dist-info/METADATA,,\n")
    monkeypatch.syspath_prepend(str(vendored))
    assert site_packages_files() == before
