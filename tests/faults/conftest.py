"""The fault-injection suite (docs/RELIABILITY.md): real training processes, 1 and 2 ranks, gloo, CPU.

Shares the trainer tests' helpers (tests/support/runs.py) and tiny corpus; the uninterrupted reference
run that the kill and signal tests compare against is trained once per session.
"""

from __future__ import annotations

import pytest
from fault_helpers import REFERENCE_STEPS, reference_config  # noqa: E402
from runs import launch, losses, tiny_corpus, write_config  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory):
    """Per-step losses of the uninterrupted 1-rank run that every interrupted run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "ref.yaml", reference_config(corpus, root / "run"))
    launch(config)
    found = losses(root / "run")
    assert sorted(found) == list(range(1, REFERENCE_STEPS + 1))
    return found
