"""One run per output directory: rank 0 holds an exclusive `flock` on `<output_dir>/.lock` while it trains.

Two runs writing one output directory would interleave their checkpoints, `latest`, config.yaml,
metrics.jsonl and `final/`. The kernel drops a `flock` when its holder dies, even by SIGKILL, so a lock is
never stale: a killed or preempted run's successor takes it at once. The file stays (removing it would let
a process that opened the old file and one that creates a new file both "hold" the lock); it records the
holder's pid, host and start time, for the message a second run gets. Only rank 0 locks; the outcome is
broadcast, so all ranks of a refused run stop with the same line. Where the filesystem refuses `flock`
(some NFS set-ups), the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from acomp.config import ConfigError
from acomp.train.distributed import Dist, broadcast_object

LOCK_NAME = ".lock"


class OutputDirBusyError(RuntimeError):
    """Another run holds the lock of train.output_dir; the message names it (pid, host) when known."""


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path, dist: Dist):
    """Hold the output directory's lock for the duration of the block (rank 0; the others only learn
    whether it was taken). Raises OutputDirBusyError on every rank when another run holds it, ConfigError
    when the directory cannot be created or written."""
    handle, problem = None, None
    if dist.is_main:
        try:
            handle = acquire(Path(output_dir))
        except OutputDirBusyError as e:
            problem = ("busy", str(e))
        except OSError as e:  # a file of that name, a path that cannot be created, no permission
            problem = (
                "config",
                f"train.output_dir={str(output_dir)!r}: cannot write there ({e.strerror or e})",
            )
    problem = broadcast_object(problem)
    if problem is not None:
        kind, message = problem
        raise (OutputDirBusyError if kind == "busy" else ConfigError)(message)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing the only descriptor releases the flock


def acquire(output_dir: Path):
    """The open lock file, locked; OutputDirBusyError when another process holds it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            print(
                f"warning: cannot lock {path} ({e.strerror}): nothing stops a second run from writing to "
                f"{output_dir} at the same time",
                file=sys.stderr,
                flush=True,
            )
            return handle
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputDirBusyError(
            f"train.output_dir={str(output_dir)!r} is in use by another run ({holder}; lock {path}): wait for "
            f"it to end, or give this run another train.output_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(describe_holder())
    handle.flush()
    return handle


def describe_holder() -> str:
    """Who holds the lock, as the refused run will read it."""
    job = os.environ.get("SLURM_JOB_ID")
    since = datetime.datetime.now().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}{f', SLURM job {job}' if job else ''}, since {since}"
