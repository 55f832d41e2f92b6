"""The corpus replaced under a running job (`build_corpus --overwrite`): the run trains to its end and keeps its
checkpoints, but refuses to export `final/`, which would pair the new corpus' tokenizer with weights trained
on the old ids (exit 2, one line naming the key that changed). A remote corpus is checked against the
manifest in its store.
"""

from __future__ import annotations

import os
import shutil

import pytest
from fault_helpers import (
    assert_checkpoints_complete,
    assert_no_traceback,
    error_lines,
    finish,
    latest,
    reference_config,
    start,
    tails,
    wait_until,
)
from runs import write_config

from acomp.train import faults

pytestmark = pytest.mark.slow

SWAP_WINDOW_S = 10  # the pause in which the test swaps the corpus (two renames, prepared beforehand)


@pytest.fixture(scope="module")
def other_corpus(corpus, tmp_path_factory):
    """Another build of the same sources (another tokenizer vocabulary): other token ids, another corpus_id."""
    from acomp.data import build_corpus

    out = tmp_path_factory.mktemp("other") / "corpus"
    build_corpus(
        source="stdlib",
        out=out,
        train_tokenizer_vocab=400,
        block_size=128,
        limit_docs=80,
        val_fraction=0.2,
        progress=False,
    )
    return out


def test_a_corpus_replaced_during_the_run_is_not_exported(corpus, other_corpus, tmp_path):
    data, replacement = tmp_path / "corpus", tmp_path / "corpus.new"
    shutil.copytree(corpus, data)
    shutil.copytree(other_corpus, replacement)
    out = tmp_path / "run"
    cfg = reference_config(corpus, out, max_steps=3, checkpoint_every=0, export_final=True)
    cfg["data"]["path"] = str(data)
    config = write_config(tmp_path / "run.yaml", cfg)
    # The only checkpoint is the final one, before the export: it pauses there while the corpus is swapped
    # the way build_corpus --overwrite swaps it (one rename over the old directory; here two renames).
    ranks = start(config, [], tmp_path / "logs", env={faults.CHECKPOINT_SLEEP: str(SWAP_WINDOW_S)})
    wait_until(lambda: "pausing" in ranks[0].output(), ranks, 240, "the final checkpoint")
    os.rename(data, tmp_path / "corpus.old")
    os.rename(replacement, data)
    codes, _ = finish(ranks, 120)
    assert codes == [2], tails(ranks)
    text = ranks[0].output()
    assert_no_traceback(text)
    lines = error_lines(text)
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith(
        f"data error: the corpus at {data} changed since this run started: its corpus_id is now "
    ), lines[0]
    assert f"; not exporting {out / 'final'}: its tokenizer would not be the one the weights were" in lines[0]
    assert lines[0].endswith(
        "put the run's corpus back at data.path and run the same command again to export"
    )
    assert not (out / "final").exists()
    assert latest(out) == "step_00000003"
    assert_checkpoints_complete(out)


def test_a_remote_corpus_is_checked_against_its_store(
    s3, remote_tiny, corpus, other_corpus, tmp_path, monkeypatch
):
    """In-process: the identity recorded from the store, then the corpus uploaded over with --overwrite."""
    from acomp.data.__main__ import main as data_main
    from acomp.train.data import DataError, open_corpus
    from acomp.train.preflight import check_corpus_unchanged, corpus_identity

    s3.apply(monkeypatch)
    uri = remote_tiny.rstrip("/") + "-export"
    assert data_main(["upload", str(corpus), uri, "--quiet"]) == 0
    opened = open_corpus(uri, tmp_path / "cache")
    started = corpus_identity(opened)
    check_corpus_unchanged(opened, started)
    assert data_main(["upload", str(other_corpus), uri, "--overwrite", "--quiet"]) == 0
    with pytest.raises(
        DataError, match=f"^the corpus at {uri} changed since this run started: its corpus_id"
    ):
        check_corpus_unchanged(opened, started)
