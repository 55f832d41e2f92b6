"""Session fixtures shared by tests/ and tests/faults/: a local S3-compatible server (tests/support/s3_server.py) and the
trainer tests' tiny corpus uploaded to it once, with the user's command (`python -m acomp.data upload`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(
    0, str(Path(__file__).resolve().parent / "support")
)  # the helper modules of every test package

from runs import tiny_corpus
from s3_server import BUCKET, start_s3_server


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def remote_tiny(s3, tmp_path_factory) -> str:
    """s3:// URI of tests/support/runs.py's tiny corpus, uploaded once per session (the command's main(),
    in-process: a subprocess would spend its time importing torch)."""
    from acomp.data.__main__ import main

    uri = f"s3://{BUCKET}/tiny"
    with pytest.MonkeyPatch.context() as monkeypatch:
        s3.apply(monkeypatch)
        assert main(["upload", str(tiny_corpus(tmp_path_factory)), uri, "--quiet"]) == 0
    return uri
