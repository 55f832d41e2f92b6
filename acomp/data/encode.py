"""Parallel tokenization whose output order never depends on the number of workers.

Chunks of documents go to worker processes; results come back strictly in submission order, with a bounded
number of chunks in flight (so a terabyte source never piles up in memory). Each worker encodes on one core
(``TOKENIZERS_PARALLELISM=false``), which makes ``num_workers`` the one knob for CPU use. Workers die with
the build process (Linux ``PR_SET_PDEATHSIG``): a killed build leaves no orphans blocked on the pool's queue.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

_encoder: Any = None
_dtype: Any = None


def init_encoder(tokenizer_json: str, dtype: str) -> None:
    """Build the Rust tokenizer in this process; literal special-token text is encoded as plain text."""
    from tokenizers import Tokenizer

    global _encoder, _dtype
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _encoder = Tokenizer.from_str(tokenizer_json)
    _encoder.encode_special_tokens = True
    _dtype = np.dtype(dtype)


def encode_texts(texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no BOS/EOS added), in the corpus dtype."""
    encodings = _encoder.encode_batch_fast(texts, add_special_tokens=False)
    return [np.array(e.ids, dtype=_dtype) for e in encodings]


def die_with_parent(parent_pid: int) -> None:
    """Make this worker process get SIGKILL when its parent dies (Linux); elsewhere a no-op.

    A pool worker otherwise outlives a killed parent forever, blocked reading a queue nobody writes.
    """
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            pr_set_pdeathsig = 1
            prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            pass
    if os.getppid() != parent_pid:  # the parent died before the call above took effect
        os._exit(1)


def _init_worker(parent_pid: int, tokenizer_json: str, dtype: str) -> None:
    die_with_parent(parent_pid)
    init_encoder(tokenizer_json, dtype)


@contextmanager
def serial_tokenizers() -> Iterator[None]:
    """Tokenize on one core in this process for the duration (restores the caller's setting)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


class Encoder:
    """Encodes chunks of texts in order, in-process (``num_workers <= 1``) or in a process pool."""

    def __init__(
        self, tokenizer_json: str, dtype: str, num_workers: int = 1, max_in_flight: int | None = None
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.max_in_flight = max_in_flight or 2 * num_workers + 2
        self._pool: ProcessPoolExecutor | None = None
        if num_workers == 1:
            init_encoder(tokenizer_json, dtype)
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(
                num_workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(os.getpid(), tokenizer_json, dtype),
            )

    def map(self, chunks: Iterable[tuple[Any, list[str]]]) -> Iterator[tuple[Any, list[np.ndarray]]]:
        """For each ``(payload, texts)`` yield ``(payload, ids_per_text)`` in input order."""
        if self._pool is None:
            for payload, texts in chunks:
                yield payload, encode_texts(texts)
            return
        pending: deque[tuple[Any, Future]] = deque()
        iterator = iter(chunks)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.max_in_flight:
                    try:
                        payload, texts = next(iterator)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append((payload, self._pool.submit(encode_texts, texts)))
                if not pending:
                    return
                payload, future = pending.popleft()
                yield payload, future.result()
        finally:
            for _, future in pending:  # the consumer stopped early: drop work nobody will read
                future.cancel()

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's workers (none before the first chunk, or in-process)."""
        return sorted(self._pool._processes or {}) if self._pool is not None else []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
