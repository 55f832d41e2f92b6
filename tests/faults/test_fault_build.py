"""Faults of the offline corpus build (preprocess/build_corpus.py): odd source trees, killed builds, damaged or
edited corpora, a write quota, a rebuilt corpus under a running job. Each gives one clear error naming the
thing (exit 2 bad input, 1 a failed write) or does the safe thing.

Builds run in-process where a hang is impossible; the FIFO, kill and quota cases run the CLI as a subprocess
under a hard time limit. All builds use the session corpus' tokenizer (no tokenizer training).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fault_helpers import assert_no_traceback
from runs import REPO, train_env

from acomp.data import build_corpus, read_manifest
from acomp.data.manifest import CorpusChangedError, check_same_corpus, corpus_identity
from acomp.data.sources import SourceSpec, resolve_files
from acomp.data.workdir import BuildDir, clean_leftovers

pytestmark = pytest.mark.slow

CLI = str(REPO / "preprocess" / "build_corpus.py")
BLOCK = 16
HANG_LIMIT_S = 180  # a hard limit against hangs only; each command takes a few seconds


def _jsonl(path: Path, first: int, n: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(first, first + n):
            fh.write(json.dumps({"text": f"doc {i}: " + " ".join(f"w{i}x{j}" for j in range(40))}) + "\n")
    return path


def _build(src, out: Path, tok: Path, **kw):
    kw = {"block_size": BLOCK, "val_fraction": 0.2, "progress": False, **kw}
    return build_corpus(str(src), out, tokenizer=str(tok), **kw)


def _cli(
    args: list[str], tok: Path, out: Path, timeout: float = HANG_LIMIT_S, **popen
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, CLI, *args, "--tokenizer", str(tok), "--block-size", str(BLOCK), "--out", str(out)]
    env = {**train_env(), "PYTHONPATH": str(REPO), **popen.pop("env", {})}
    return subprocess.run(
        [*cmd, "--quiet"], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, **popen
    )


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.building-"))


@pytest.fixture(scope="module")
def tok(corpus) -> Path:
    return corpus / "tokenizer"


# ---------------------------------------------------------------- odd source trees


def _odd_tree(root: Path) -> Path:
    """30 documents in 6 files, one dir reached through a symlink, plus 7 entries that must be skipped."""
    src = root / "src"
    _jsonl(src / "a.jsonl", 0)
    _jsonl(src / "real" / "b.jsonl", 5)
    _jsonl(src / "real" / "c.jsonl", 10)
    _jsonl(root / "elsewhere" / "d.jsonl", 15)
    _jsonl(root / "elsewhere" / "e.jsonl", 20)
    _jsonl(root / "other" / "f.jsonl", 25)
    (src / "linked").symlink_to(root / "elsewhere")  # a symlinked subdirectory: read
    (src / "f.jsonl").symlink_to(root / "other" / "f.jsonl")  # a symlinked file: read
    (src / "alias").symlink_to(src / "real")  # a second way into real/: skipped
    (src / "real" / "loop").symlink_to(src)  # a cycle: skipped, the walk ends
    (src / "dup.jsonl").symlink_to(src / "a.jsonl")  # a file reached twice: read once
    (src / "gone.jsonl").symlink_to(src / "nowhere.jsonl")  # dangling
    (src / "self.jsonl").symlink_to(src / "self.jsonl")  # ELOOP
    os.mkfifo(src / "pipe.jsonl")  # opening it would block forever
    with socket.socket(socket.AF_UNIX) as sock:  # a socket file stays after close
        sock.bind(str(src / "sock.txt"))
    return src


SKIPPED = {
    "alias": "symlink to a directory already listed as real/",
    "real/loop": "symlink to a directory already listed as .",
    "dup.jsonl": "same file as a.jsonl",
    "gone.jsonl": "dangling symlink",
    "self.jsonl": "symlink loop",
    "pipe.jsonl": "a FIFO, not a regular file",
    "sock.txt": "a socket, not a regular file",
}


class FifoWatch:
    """Notices a reader opening the FIFO and lets it go at once (EOF): a build that opens it fails the test
    instead of hanging it."""

    def __init__(self, fifo: Path):
        self.fifo, self.opened, self._stop = fifo, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads
                self.opened = True
            except OSError:
                pass

    def __enter__(self) -> FifoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cli_module():
    sys.path.insert(0, str(REPO / "preprocess"))
    try:
        import build_corpus as cli
    finally:
        sys.path.remove(str(REPO / "preprocess"))
    return cli


def test_fifos_sockets_and_symlinks_in_a_source_tree(tmp_path, tok, capsys):
    src = _odd_tree(tmp_path)
    listing = resolve_files(SourceSpec(str(src)))
    names = [p.relative_to(src).as_posix() for p in listing.files]
    assert names == ["a.jsonl", "f.jsonl", "linked/d.jsonl", "linked/e.jsonl", "real/b.jsonl", "real/c.jsonl"]
    reasons = {Path(i.path).relative_to(src).as_posix(): i.detail for i in listing.skipped}
    assert set(reasons) == set(SKIPPED) and all(SKIPPED[k] in reasons[k] for k in SKIPPED), reasons

    out = tmp_path / "out"
    args = ["--source", str(src), "--tokenizer", str(tok), "--block-size", str(BLOCK), "--num-workers", "1"]
    with FifoWatch(src / "pipe.jsonl") as watch:
        code = _cli_module().main([*args, "--out", str(out), "--quiet"])
        stdout = capsys.readouterr().out
        for what, match in (
            ("pipe.jsonl", "is a FIFO, not a regular file"),
            ("gone.jsonl", "dangling symlink"),
        ):
            with pytest.raises((ValueError, FileNotFoundError), match=match):
                _build(src / what, tmp_path / "never", tok)
    assert not watch.opened, "the build opened a FIFO"
    assert code == 0 and "30 documents" in stdout and "7 skipped" in stdout, stdout
    m = read_manifest(out)
    assert m["input"]["documents"] == 30
    skipped = {Path(i["path"]).relative_to(src).as_posix(): i["reason"] for i in m["input"]["skipped_files"]}
    assert skipped == reasons
    assert any("skipped 7 source entries" in w for w in m["warnings"])
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- killed builds


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_killed_build_leaves_no_workers_and_its_leftovers_are_removed(tmp_path, tok):
    src = _jsonl(tmp_path / "src" / "docs.jsonl", 0, 60)
    out, log = tmp_path / "out", tmp_path / "build.log"
    cmd = [sys.executable, CLI, "--source", str(src), "--tokenizer", str(tok), "--block-size", str(BLOCK)]
    env = {**train_env(), "PYTHONPATH": str(REPO), "ACOMP_FAULT_BUILD_PAUSE_S": "600"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [*cmd, "--num-workers", "2", "--out", str(out), "--quiet"], stdout=fh, stderr=fh, env=env
        )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + HANG_LIMIT_S
        while "build paused" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        workers = [int(p) for p in re.search(r"workers \[([\d, ]+)\]", log.read_text()).group(1).split(",")]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        assert len(_leftovers(out)) == 2  # the build directory and its lock
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers), "tokenizer workers outlived their killed build"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _alive(pid):  # orphans of a failed check: ours to end
                os.kill(pid, signal.SIGKILL)
    assert len(_leftovers(out)) == 2 and not out.exists()
    m = _build(src, out, tok)  # the next run removes them and builds
    assert _leftovers(out) == [] and m["input"]["documents"] == 60


def test_leftovers_of_a_running_build_are_kept(tmp_path, caplog):
    out = tmp_path / "corpus"
    running = BuildDir(out)  # holds its lock, as a build in another process would
    (running.path / "train").mkdir()
    dead = tmp_path / ".corpus.building-dead"
    dead.mkdir()
    Path(f"{dead}.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": "elsewhere"}))  # nobody holds it
    legacy = tmp_path / ".corpus.building-k2j4h5"  # an older acomp's: no lock file
    legacy.mkdir()
    with caplog.at_level(logging.WARNING):
        removed = clean_leftovers(out)
    assert removed == [dead] and not Path(f"{dead}.lock").exists()
    assert (running.path / "train").is_dir() and running.lock.is_file()
    assert legacy.is_dir() and "no lock file" in caplog.text
    running.discard()
    assert not running.path.exists() and not running.lock.exists()


# ---------------------------------------------------------------- the up-to-date check


def test_same_size_source_edit_with_its_mtime_kept_is_noticed(tmp_path, tok):
    src = _jsonl(tmp_path / "docs.jsonl", 0, 20)
    out = tmp_path / "out"
    first = _build(src, out, tok)
    stat = src.stat()
    data = src.read_bytes()
    src.write_bytes(data.replace(b"w3x7 ", b"w3x8 ", 1))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size and src.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(
        FileExistsError, match=r"source file .*docs\.jsonl changed since the build \(its sha256"
    ):
        _build(src, out, tok)
    second = _build(src, out, tok, overwrite=True)
    assert second["fingerprint"] != first["fingerprint"] and second["corpus_id"] != first["corpus_id"]


@pytest.mark.parametrize("damage", ["flipped_shard", "missing_index", "edited_counts", "deleted_tokenizer"])
def test_a_damaged_corpus_is_rebuilt_not_reported_up_to_date(tmp_path, tok, caplog, damage):
    src = _jsonl(tmp_path / "docs.jsonl", 0, 20)
    out = tmp_path / "out"
    m = _build(src, out, tok)
    good = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    shard = next((out / "train").glob("shard.*"))
    if damage == "flipped_shard":  # same size: only the hash catches it
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "missing_index":
        (out / "val" / "index.json").unlink()
    elif damage == "edited_counts":
        edited = json.loads((out / "manifest.json").read_text())
        edited["splits"]["train"]["blocks"] += 1
        (out / "manifest.json").write_text(json.dumps(edited))
    else:
        shutil.rmtree(out / "tokenizer")
    with caplog.at_level(logging.WARNING):
        again = _build(src, out, tok)
    assert "is damaged" in caplog.text and "building it again" in caplog.text
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == good
    assert again["corpus_id"] == m["corpus_id"] and _leftovers(out) == []


# ---------------------------------------------------------------- tokenizer training


def test_a_trained_vocabulary_is_never_silently_smaller_than_asked(tmp_path):
    src = _jsonl(tmp_path / "docs.jsonl", 0, 10)
    with pytest.raises(ValueError, match=r"val_fraction=1.0 puts every document in the val split.*1024"):
        build_corpus(str(src), tmp_path / "o", train_tokenizer_vocab=1024, val_fraction=1.0, progress=False)
    with pytest.raises(
        ValueError, match=r"train_tokenizer_vocab=4096: the trained tokenizer has only \d+ tokens"
    ):
        build_corpus(str(src), tmp_path / "o", train_tokenizer_vocab=4096, block_size=BLOCK, progress=False)
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path / "o") == []


# ---------------------------------------------------------------- disk full


def test_a_write_quota_gives_one_line_naming_the_file_and_exit_1(tmp_path, tok):
    import resource

    quota = 64 * 1024  # the tokenizer files fit, the first shard (about 300 KB) does not
    out = tmp_path / "out"
    proc = _cli(
        ["--source", "stdlib", "--limit-docs", "40", "--num-workers", "1"],
        tok,
        out,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (quota, quota)),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert_no_traceback(proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    pattern = (
        rf"could not write \S+/\.out\.building-\w+/train/shard\.00000\.mds while building {out}: File too large "
        rf"\(\d+ MiB free there, file size limit {quota} bytes \(ulimit -f\);.*nothing was installed there"
    )
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists() and _leftovers(out) == []


# ---------------------------------------------------------------- an edited manifest


@pytest.mark.parametrize(
    "key, value, expected",
    [
        (
            "splits.train.blocks",
            7,
            "manifest.json disagrees with train/index.json: splits.train.blocks is 7 but the index lists",
        ),
        (
            "block_size",
            32,
            "manifest.json disagrees with train/index.json: block_size is 32 but its shards store blocks of 16",
        ),
        (
            "vocab_size",
            9999,
            "manifest.json disagrees with tokenizer/tokenizer.json: vocab_size is 9999 but the tokenizer has",
        ),
        (
            "special_token_ids.sum",
            7,
            "disagrees with tokenizer/tokenizer.json: special_token_ids.sum is 7 but the tokenizer",
        ),
    ],
)
def test_an_edited_manifest_is_reported_as_such(tmp_path, tok, key, value, expected):
    from acomp.train.data import DataError, open_corpus

    out = tmp_path / "out"
    _build(_jsonl(tmp_path / "docs.jsonl", 0, 20), out, tok)
    manifest = json.loads((out / "manifest.json").read_text())
    *parents, last = key.split(".")
    target = manifest
    for part in parents:
        target = target[part]
    target[last] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=re.escape(expected)):
        read_manifest(out)
    with pytest.raises(DataError, match=re.escape(expected)):  # what the trainer reports, before any model
        open_corpus(out)


# ---------------------------------------------------------------- --overwrite under a running job


def test_overwrite_gives_a_new_identity_that_a_job_can_check(tmp_path, tok):
    src = _jsonl(tmp_path / "docs.jsonl", 0, 20)
    out = tmp_path / "out"
    _build(src, out, tok)
    started = corpus_identity(out)  # what a job records when it starts
    _build(src, out, tok, overwrite=True)  # the same corpus again: the same identity
    check_same_corpus(out, started, since="the run started")
    _build(src, out, tok, overwrite=True, block_size=8)
    with pytest.raises(
        CorpusChangedError, match=r"changed since the run started: its corpus_id is now '\w+', was"
    ):
        check_same_corpus(out, started, since="the run started")
    assert read_manifest(out)["block_size"] == 8 and _leftovers(out) == []
