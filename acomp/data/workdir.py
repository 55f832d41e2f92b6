"""Where a build writes before its corpus exists: a hidden directory next to ``out``, locked while in use.

A build writes into ``.NAME.building-XXXX/`` beside ``out`` and holds an exclusive ``flock`` on
``.NAME.building-XXXX.lock`` (which also records its pid and host) for as long as it runs. The kernel drops
the lock when the process dies, however it dies, so the next build tells a killed build's leftovers (lock
free: removed) from a build still running (lock held: left alone). On a filesystem without ``flock`` the
recorded pid decides, and only on the same host. The finished corpus replaces ``out`` in one atomic step
(``renameat2(RENAME_EXCHANGE)`` on Linux; two renames elsewhere), so a reader never finds ``out`` missing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import resource
import shutil
import socket
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BUILDING = ".building-"
LOCK_SUFFIX = ".lock"
OLD_SUFFIX = ".old"
# errnos that mean "this write could not be stored": reported as CorpusWriteError with the free space.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS})


class CorpusWriteError(OSError):
    """Writing the corpus failed (disk full, quota, file size limit, I/O error); nothing was installed."""


def free_space(path: str | Path) -> str:
    """What may have stopped a write: free space there, and a file size limit (``ulimit -f``) if one is set."""
    try:
        found = f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free there"
    except OSError:
        found = "free space unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        found += f", file size limit {limit} bytes (ulimit -f)"
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not on this filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


class BuildDir:
    """The locked hidden directory one build writes into; :meth:`install` moves it to ``out``."""

    def __init__(self, out: Path):
        self.out = out
        for _ in range(100):
            fd, lock = tempfile.mkstemp(prefix=f".{out.name}{BUILDING}", suffix=LOCK_SUFFIX, dir=out.parent)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a cleaner is looking at this brand-new lock: take another name
                os.close(fd)
                os.unlink(lock)
                continue
            except OSError:  # no flock here: the pid and host below decide
                pass
            break
        else:  # pragma: no cover - 100 collisions with cleaners
            raise RuntimeError(f"could not lock a build directory next to {out}")
        self._fd: int | None = fd
        self.lock = Path(lock)
        self.path = Path(lock[: -len(LOCK_SUFFIX)])
        try:
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            os.mkdir(self.path, 0o700)
        except BaseException:
            self.discard()
            raise

    def newest_file(self) -> Path | None:
        """The file written last under the build directory (the one a failed write was writing)."""
        files = [p for p in self.path.rglob("*") if p.is_file()] if self.path.is_dir() else []
        return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)

    def install(self) -> None:
        """Put the finished build at ``out``; an old corpus there is swapped out in one step, then deleted."""
        out = self.out
        if not (out.exists() or out.is_symlink()):
            os.rename(self.path, out)
        elif _exchange(self.path, out):
            _remove(self.path)  # now the old corpus
        else:
            old = Path(f"{self.path}{OLD_SUFFIX}")
            os.rename(out, old)
            os.rename(self.path, out)
            _remove(old)
        self._release()

    def discard(self) -> None:
        """Remove what this build wrote (a failed or interrupted build)."""
        _remove(self.path)
        _remove(Path(f"{self.path}{OLD_SUFFIX}"))
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed builds of ``out`` left next to it; returns the removed directories.

    A build directory is removed only when its lock is free (its build is dead): a running build, here or on
    another host sharing the filesystem, holds the lock. A lock that cannot be taken (no ``flock`` on this
    filesystem) falls back to the recorded pid, on this host only. A build directory without a lock file
    (left by an older acomp) is reported, never removed.
    """
    parent, prefix = out.parent, f".{out.name}{BUILDING}"
    if not parent.is_dir():
        return []
    names = sorted(p.name for p in parent.iterdir() if p.name.startswith(prefix))
    removed = []
    for lock in (parent / n for n in names if n.endswith(LOCK_SUFFIX)):
        work = Path(str(lock)[: -len(LOCK_SUFFIX)])
        if _owner_is_dead(lock):
            for path in (work, Path(f"{work}{OLD_SUFFIX}")):
                if path.exists() or path.is_symlink():
                    _remove(path)
                    removed.append(path)
            lock.unlink(missing_ok=True)
    for work in (parent / n for n in names if not n.endswith((LOCK_SUFFIX, OLD_SUFFIX))):
        if work.exists() and not Path(f"{work}{LOCK_SUFFIX}").exists():
            log.warning(
                "%s looks like a build directory left by an older acomp (it has no lock file); delete it by "
                "hand if no build of %s is running",
                work,
                out,
            )
    if removed:
        log.warning("removed %d leftover(s) of killed builds of %s: %s", len(removed), out, removed)
    return removed


def _owner_is_dead(lock: Path) -> bool:
    """True when the build that created ``lock`` is gone (its flock is free, or its pid is dead here)."""
    try:
        fd = os.open(lock, os.O_RDWR)  # NFS emulates flock with fcntl locks: LOCK_EX needs write access
    except OSError:
        return False  # removed meanwhile (its build finished), or not ours to read
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held: the build is running
        except OSError:
            owner = _read_owner(fd)
            return bool(owner) and owner.get("host") == socket.gethostname() and not _pid_alive(owner["pid"])
        # Free. An empty lock is a build between creating and writing it (it locks before it writes).
        return bool(_read_owner(fd))
    finally:
        os.close(fd)


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
