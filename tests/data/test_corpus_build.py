"""The offline corpus pipeline: layout, round trip, determinism, sources, recipes, bad input, CLI."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import zstandard
from corpora import BLOCK, LIMIT_DOCS, REPO, VOCAB, read_split, stdlib_corpus, tree_hashes
from transformers import AutoTokenizer

from acomp.data import (
    SourceFormatError,
    build_corpus,
    check_manifest,
    load_recipe,
    read_manifest,
    split_of,
    stdlib_root,
)
from acomp.data.sources import decode_utf8

SMALL = 16  # block size for the hand-made sources below


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return stdlib_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def tok_dir(corpus):
    return corpus / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def _write_jsonl(path: Path, records: list[dict], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def _docs(n: int = 6) -> list[dict]:
    """Records long enough for a few 16-token blocks each, in two domains."""
    return [
        {"text": f"Document {i}: " + " ".join(f"word{i}_{j}" for j in range(12 + 3 * i)), "src": "ab"[i % 2]}
        for i in range(n)
    ]


def _build(tmp_path, tok_dir, source, **kw):
    kw.setdefault("block_size", SMALL)
    kw.setdefault("val_fraction", 0.0)
    return build_corpus(source, tmp_path / "out", tokenizer=str(tok_dir), progress=False, **kw)


# ---------------------------------------------------------------- layout and manifest


def test_layout_manifest_and_tokenizer(corpus, tokenizer):
    m = read_manifest(corpus)
    for key in (
        "block_size",
        "vocab_size",
        "tokenizer",
        "special_tokens",
        "special_token_ids",
        "splits",
        "sources",
        "command",
        "dtype",
        "format_version",
    ):
        assert key in m
    assert m["block_size"] == BLOCK and m["vocab_size"] == VOCAB == len(tokenizer)
    assert m["dtype"] == "uint16"
    assert m["special_tokens"]["sum"] == "<sum>" and m["special_tokens"]["eoc"] == "<eoc>"
    assert {"<sum>", "<eoc>"} <= set(tokenizer.additional_special_tokens)
    for role, token in m["special_tokens"].items():
        assert tokenizer.convert_tokens_to_ids(token) == m["special_token_ids"][role]
    assert m["tokenizer"]["sha256"] and m["tokenizer"]["path"] == "tokenizer"
    assert m["input"]["documents"] == LIMIT_DOCS
    for split in ("train", "val"):
        assert (corpus / split / "index.json").is_file()
        assert m["splits"][split]["blocks"] > 0
    files = m["sources"][0]["files"]
    assert files and all(len(f["sha256"]) == 64 and f["bytes"] >= 0 for f in files)
    check_manifest(m, vocab_size=VOCAB, block_size=BLOCK, special_tokens={"sum": "<sum>", "eoc": "<eoc>"})


def test_counts_add_up(corpus):
    m = read_manifest(corpus)
    for split in m["splits"].values():
        for c in [split, *split["domains"].values()]:
            assert c["tokens"] == c["blocks"] * BLOCK
            dropped = c["dropped_short_tokens"] + c["dropped_remainder_tokens"] + c["dropped_budget_tokens"]
            assert c["input_tokens"] == c["tokens"] + dropped
    assert sum(s["docs"] for s in m["splits"].values()) == m["input"]["documents"]


# ---------------------------------------------------------------- round trip


def test_round_trip_every_block_decodes_to_its_source(corpus, tokenizer):
    m = read_manifest(corpus)
    root = stdlib_root()
    special = set(m["special_token_ids"].values())
    seen_docs: dict[str, str] = {}
    for split in ("train", "val"):
        samples = read_split(corpus, split)
        assert len(samples) == m["splits"][split]["blocks"]
        by_doc: dict[str, list] = defaultdict(list)
        for s in samples:
            ids = s["input_ids"]
            assert ids.dtype == np.uint16 and ids.shape == (BLOCK,)
            assert not special & set(np.unique(ids).tolist()), "control/special ids leaked into the data"
            by_doc[s["doc_id"]].append((int(s["block_index"]), ids))
            assert seen_docs.setdefault(s["doc_id"], split) == split, "a document is in both splits"
        for doc_id, blocks in by_doc.items():
            blocks.sort(key=lambda b: b[0])
            assert [b[0] for b in blocks] == list(range(len(blocks)))
            text, _ = decode_utf8((root / doc_id).read_bytes())
            full = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            assert len(blocks) == len(full) // BLOCK, doc_id
            kept = np.concatenate([b[1] for b in blocks]).tolist()
            assert kept == full[: len(kept)]
            decoded = tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert text.startswith(decoded.rstrip("\ufffd")), doc_id


def test_split_assignment_is_by_document_hash(corpus):
    m = read_manifest(corpus)
    for split in ("train", "val"):
        for s in read_split(corpus, split)[:50]:
            assert split_of(s["doc_id"], s["domain"], 0, m["options"]["val_fraction"]) == split


# ---------------------------------------------------------------- determinism


def test_byte_identical_for_any_worker_count(tmp_path):
    kw = dict(train_tokenizer_vocab=1024, block_size=256, limit_docs=120, val_fraction=0.1, progress=False)
    one = build_corpus("stdlib", tmp_path / "w1", num_workers=1, **kw)
    two = build_corpus("stdlib", tmp_path / "w2", num_workers=2, **kw)
    assert one["splits"]["train"]["blocks"] > 100
    h1 = tree_hashes(tmp_path / "w1", skip=("manifest.json",))
    h2 = tree_hashes(tmp_path / "w2", skip=("manifest.json",))
    assert h1 == h2 and any(k.startswith("train/shard.") for k in h1)
    one.pop("command"), two.pop("command")
    assert one == two


# ---------------------------------------------------------------- tokenizers


def test_given_tokenizer_is_reused_unchanged(tmp_path, corpus, tok_dir):
    m = build_corpus(
        "stdlib", tmp_path / "given", tokenizer=str(tok_dir), block_size=BLOCK, limit_docs=40, progress=False
    )
    ref = read_manifest(corpus)
    assert m["vocab_size"] == ref["vocab_size"]
    assert m["tokenizer"]["sha256"] == ref["tokenizer"]["sha256"]
    assert m["special_token_ids"] == ref["special_token_ids"]
    assert (
        AutoTokenizer.from_pretrained(str(tmp_path / "given" / "tokenizer")).get_vocab()
        == AutoTokenizer.from_pretrained(str(tok_dir)).get_vocab()
    )


def test_literal_special_token_text_is_plain_text(tmp_path, tok_dir, tokenizer):
    text = "x = '<sum>' + \"<eoc>\" # <|endoftext|> <pad> " * 20
    src = _write_jsonl(tmp_path / "lit.jsonl", [{"text": text}])
    m = _build(tmp_path, tok_dir, str(src))
    ids = np.concatenate([s["input_ids"] for s in read_split(tmp_path / "out", "train")])
    assert not set(m["special_token_ids"].values()) & set(ids.tolist())
    assert text.startswith(tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False))


def test_tokenizer_choice_errors(tmp_path, tok_dir):
    with pytest.raises(ValueError, match="exactly one of tokenizer"):
        build_corpus("stdlib", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="exactly one of tokenizer"):
        build_corpus(
            "stdlib", tmp_path / "o", tokenizer=str(tok_dir), train_tokenizer_vocab=512, progress=False
        )
    with pytest.raises(ValueError, match="too small"):
        build_corpus("stdlib", tmp_path / "o", train_tokenizer_vocab=100, limit_docs=5, progress=False)
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(ValueError, match="could not load tokenizer '.*no-such-tokenizer'"):
        build_corpus("stdlib", tmp_path / "o", tokenizer=missing, limit_docs=5, progress=False)


def test_a_remote_out_is_refused_in_python(tmp_path, monkeypatch):
    """The CLI builds locally then uploads; build_corpus itself would make a directory named 's3:/bucket'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^out='s3://bucket/p': build_corpus writes a local directory; "):
        build_corpus("stdlib", "s3://bucket/p", train_tokenizer_vocab=512, limit_docs=5, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- sources


def _make_source(kind: str, tmp_path: Path, records: list[dict]) -> str:
    if kind == "jsonl":
        return str(_write_jsonl(tmp_path / "d.jsonl", records))
    if kind == "jsonl.gz":
        return str(_write_jsonl(tmp_path / "d.jsonl.gz", records, opener=gzip.open))
    if kind == "jsonl.zst":
        return str(_write_jsonl(tmp_path / "d.jsonl.zst", records, opener=zstandard.open))
    if kind == "txt":
        d = tmp_path / "txt"
        d.mkdir()
        for i, r in enumerate(records):
            (d / f"doc{i:02}.txt").write_text(r["text"], encoding="utf-8")
        return str(d)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "saved":
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "txt", "parquet", "saved"])
def test_every_source_kind_gives_the_same_blocks(tmp_path, tok_dir, kind):
    records = _docs()
    m = _build(tmp_path, tok_dir, _make_source(kind, tmp_path, records))
    samples = read_split(tmp_path / "out", "train")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    expected = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) // SMALL for r in records)
    assert m["splits"]["train"]["blocks"] == len(samples) == expected
    assert len({s["doc_id"] for s in samples}) == len(records)
    assert m["input"]["documents"] == len(records)


def test_glob_source_reads_matching_files_in_order(tmp_path, tok_dir):
    d = tmp_path / "shards"
    d.mkdir()
    docs = _docs()
    _write_jsonl(d / "01.jsonl", docs[3:])
    _write_jsonl(d / "00.jsonl", docs[:3])
    (d / "notes.md").write_text("not a source")
    m = _build(tmp_path, tok_dir, str(d / "*.jsonl"))
    assert set(m["splits"]["train"]["domains"]) == {"shards"}
    assert [f["path"] for f in m["sources"][0]["files"]] == ["00.jsonl", "01.jsonl"]
    ids = [s["doc_id"] for s in read_split(tmp_path / "out", "train")]
    assert ids[0] == "00.jsonl:1" and ids[-1] == "01.jsonl:3"


def test_domain_field_labels_and_domain_name(tmp_path, tok_dir):
    src = _write_jsonl(tmp_path / "mixed.jsonl", [{**r, "meta": {"set": r["src"]}} for r in _docs()])
    m = _build(tmp_path, tok_dir, str(src), domain_field="meta.set")
    assert set(m["splits"]["train"]["domains"]) == {"a", "b"}
    assert {s["domain"] for s in read_split(tmp_path / "out", "train")} == {"a", "b"}
    m = build_corpus(
        str(src),
        tmp_path / "named",
        tokenizer=str(tok_dir),
        block_size=SMALL,
        val_fraction=0,
        domain="law",
        id_field="src",
        progress=False,
    )
    assert set(m["splits"]["train"]["domains"]) == {"law"}


def test_limit_docs_and_max_tokens(tmp_path, tok_dir):
    m = _build(tmp_path, tok_dir, "stdlib", block_size=64, limit_docs=30, max_tokens=640)
    assert m["input"]["documents"] <= 30
    assert m["splits"]["train"]["blocks"] == 10  # exactly the budget: 640 // 64
    assert m["splits"]["train"]["dropped_budget_tokens"] >= 0
    with pytest.raises(ValueError, match="max_tokens=10 is smaller than one block"):
        _build(tmp_path, tok_dir, "stdlib", block_size=64, max_tokens=10)


def test_reading_stops_once_the_budgets_are_full_whether_the_domain_is_named_or_not(tmp_path, tok_dir):
    """Naming the source's default domain (`--domain stdlib`) builds the same corpus as leaving it out: with
    no val cap, val takes its share of the documents read until the train budget is full, then reading stops."""
    kw = dict(block_size=64, limit_docs=80, max_tokens=640, val_fraction=0.2)
    manifests = []
    for domain in (None, "stdlib"):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        manifests.append(_build(tmp_path, tok_dir, "stdlib", domain=domain, **kw))
    counts = [
        (m["input"]["documents"], m["splits"]["train"]["blocks"], m["splits"]["val"]["blocks"])
        for m in manifests
    ]
    assert counts[0] == counts[1] and counts[0][0] < 80 and counts[0][1] == 10


# ---------------------------------------------------------------- bad input


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, tok_dir):
    d = tmp_path / "bad"
    d.mkdir()
    good = " ".join(f"token{i}" for i in range(40))
    (d / "a.txt").write_bytes(good.encode() + b"\xff\xfe caf\xe9 " + good.encode())
    (d / "b.jsonl").write_bytes(b'{"text": "' + good.encode() + b' \x80\x81 end"}\n')
    (d / "c.jsonl").write_text(json.dumps({"text": good + " \ud800 lone"}) + "\n")
    m = _build(tmp_path, tok_dir, str(d))
    assert m["input"]["documents"] == 3
    assert m["input"]["docs_with_replacements"] == 3
    assert m["input"]["replaced_sequences"] >= 4
    assert m["splits"]["train"]["blocks"] > 0


def test_empty_and_unreadable_files_are_counted_not_fatal(tmp_path, tok_dir):
    d = tmp_path / "mix"
    d.mkdir()
    _write_jsonl(d / "a_good.jsonl", _docs())
    (d / "b_empty.jsonl").write_bytes(b"")
    (d / "c_empty.txt").write_bytes(b"")
    whole = gzip.compress(("\n".join(json.dumps(r) for r in _docs(40)) + "\n").encode())
    (d / "d_truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    m = _build(tmp_path, tok_dir, str(d))
    empty = {Path(p).name for p in m["input"]["empty_files"]}
    assert empty == {"b_empty.jsonl", "c_empty.txt"}
    (bad,) = m["input"]["unreadable_files"]
    assert bad["path"].endswith("d_truncated.jsonl.gz") and "EOFError" in bad["error"]
    assert m["input"]["documents"] >= len(_docs())


def test_missing_text_field_names_file_and_line(tmp_path, tok_dir):
    src = _write_jsonl(tmp_path / "x.jsonl", [{"text": "fine " * 20}, {"content": "no text here"}])
    with pytest.raises(SourceFormatError, match=r"x\.jsonl:2: record has no text field 'text'.*content"):
        _build(tmp_path, tok_dir, str(src))
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(SourceFormatError, match=r"y\.jsonl:2: not valid JSON"):
        _build(tmp_path, tok_dir, str(tmp_path / "y.jsonl"))
    assert not (tmp_path / "out").exists(), "a failed build must not leave a corpus behind"


def test_all_documents_too_short(tmp_path, tok_dir):
    src = _write_jsonl(tmp_path / "s.jsonl", [{"text": "tiny"}] * 3)
    with pytest.raises(
        ValueError, match="no blocks were written: 3 documents read, 3 shorter than block_size"
    ):
        _build(tmp_path, tok_dir, str(src))


def test_out_dir_holding_a_different_corpus(tmp_path, tok_dir):
    src = str(_write_jsonl(tmp_path / "d.jsonl", _docs()))
    _build(tmp_path, tok_dir, src)
    shard = next((tmp_path / "out" / "train").glob("shard.*"))
    before = shard.stat().st_mtime_ns
    _build(tmp_path, tok_dir, src)  # same options and sources: reused, not rebuilt
    assert shard.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match=r"already holds a different corpus \(block_size: 16 -> 8"):
        _build(tmp_path, tok_dir, src, block_size=8)
    m = _build(tmp_path, tok_dir, src, block_size=8, overwrite=True)
    assert read_manifest(tmp_path / "out")["block_size"] == m["block_size"] == 8
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty and holds no corpus manifest"):
        build_corpus(src, other, tokenizer=str(tok_dir), block_size=SMALL, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"


def test_compression(tmp_path, tok_dir):
    src = str(_write_jsonl(tmp_path / "d.jsonl", _docs()))
    with pytest.raises(ValueError, match="gzip embeds a timestamp"):
        _build(tmp_path, tok_dir, src, compression="gz")
    with pytest.raises(ValueError, match="unknown compression 'lz9'"):
        _build(tmp_path, tok_dir, src, compression="lz9")
    m = _build(tmp_path, tok_dir, src, compression="zstd:7")
    assert m["compression"] == "zstd:7"
    assert list((tmp_path / "out" / "train").glob("shard.*.mds.zstd"))
    assert len(read_split(tmp_path / "out", "train")) == m["splits"]["train"]["blocks"]


# ---------------------------------------------------------------- recipes


def test_shipped_recipes_state_the_paper_mix():
    six = load_recipe(REPO / "preprocess/recipes/6k.yaml", expand=False)
    assert six.block_size == 6144
    train = {d.name: d.train_tokens for d in six.domains if d.train_tokens}
    assert train == dict.fromkeys(["Books3", "Github", "FreeLaw", "Wikipedia"], 500_000_000)
    assert {d.name for d in six.domains if d.train_tokens == 0} == {
        "Gutenberg",
        "HackerNews",
        "ArXiv",
        "YoutubeSubtitles",
    }
    thirty = load_recipe(REPO / "preprocess/recipes/30k.yaml", expand=False)
    assert thirty.block_size == 30720
    assert [(d.name, d.train_tokens) for d in thirty.domains if d.train_tokens] == [("Books3", 2_000_000_000)]
    llama = load_recipe(REPO / "preprocess/recipes/6k-llama.yaml", expand=False)
    assert abs(sum(d.train_tokens for d in llama.domains) - 15_000_000_000) < 100_000_000


def test_recipe_sources_need_their_paths(monkeypatch):
    monkeypatch.delenv("PILE_DIR", raising=False)
    with pytest.raises(ValueError, match="unset environment variable PILE_DIR"):
        load_recipe(REPO / "preprocess/recipes/6k.yaml")
    monkeypatch.setenv("PILE_DIR", "/data/pile")
    r = load_recipe(REPO / "preprocess/recipes/30k.yaml", domain_sources={"Books3": "/b3/*.jsonl"})
    books = r.domains[0]
    assert books.source == "/b3/*.jsonl" and books.match is None
    assert r.domains[1].source == "/data/pile/train/*.jsonl.zst" and r.domains[1].match == "Gutenberg (PG-19)"
    with pytest.raises(ValueError, match="not domains of recipe"):
        load_recipe(REPO / "preprocess/recipes/30k.yaml", domain_sources={"Nope": "/x"})


def test_tiny_local_recipe_build(tmp_path, tok_dir, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    docs = [
        {"text": " ".join(f"w{i}x{j}" for j in range(60)), "meta": {"set": "AB"[i % 2]}} for i in range(40)
    ]
    _write_jsonl(data / "mixed.jsonl", docs)
    _write_jsonl(data / "eval.jsonl", docs[:10])
    monkeypatch.setenv("TINY_DATA", str(data))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""
name: tiny
block_size: {SMALL}
tokenizer: {tok_dir}
val_fraction: 0.25
domains:
  A: {{source: "${{TINY_DATA}}/mixed.jsonl", domain_field: meta.set, train_tokens: {SMALL * 7}, val_tokens: {SMALL * 3}}}
  B: {{source: data/mixed.jsonl, domain_field: meta.set, train_tokens: 5K}}
  Held: {{source: data/eval.jsonl, train_tokens: 0, val_tokens: {SMALL * 4}}}
"""
    )
    m = build_corpus(recipe=recipe, out=tmp_path / "out", progress=False)
    train, val = m["splits"]["train"]["domains"], m["splits"]["val"]["domains"]
    assert train["A"]["blocks"] == 7 and val["A"]["blocks"] == 3
    assert train["B"]["blocks"] > 7 and "Held" not in train
    assert val["Held"]["blocks"] == 4
    samples = read_split(tmp_path / "out", "train")
    a_docs = {s["doc_id"] for s in samples if s["domain"] == "A"}
    # only records whose meta.set is "A": odd line numbers
    assert all(int(d.split(":")[1]) % 2 == 1 for d in a_docs)
    with pytest.raises(ValueError, match="either a recipe or a source"):
        build_corpus("stdlib", tmp_path / "o2", recipe=recipe, progress=False)


# ---------------------------------------------------------------- CLI


def test_cli_builds_and_reports(tmp_path, tok_dir):
    src = _write_jsonl(tmp_path / "d.jsonl", _docs())
    script = str(REPO / "preprocess" / "build_corpus.py")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run(
        [
            sys.executable,
            script,
            "--source",
            str(src),
            "--tokenizer",
            str(tok_dir),
            "--block-size",
            "16",
            "--val-fraction",
            "0",
            "--num-workers",
            "2",
            "--out",
            str(tmp_path / "cli"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )
    assert ok.returncode == 0, ok.stderr
    assert "corpus at" in ok.stdout and "train" in ok.stdout
    m = read_manifest(tmp_path / "cli")
    assert "--num-workers 2" in m["command"]


def test_cli_errors_exit_2(tmp_path, tok_dir, capsys):
    sys.path.insert(0, str(REPO / "preprocess"))
    try:
        import build_corpus as cli
    finally:
        sys.path.remove(str(REPO / "preprocess"))
    src = _write_jsonl(tmp_path / "x.jsonl", [{"body": "no text"}])
    code = cli.main(
        ["--source", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert code == 2
    assert "x.jsonl:1: record has no text field 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--source", "stdlib", "--out", str(tmp_path / "o"), "--domain-source", "bad"])
