"""argparse types of the project's scripts (preprocess, benchmarks): a bad count or amount exits 2 naming it at
parse time, before any corpus, model or GPU check, not as a traceback after the work it spoiled."""

from __future__ import annotations

import argparse


def _at_least(text: str, kind: type, least: float, strict: bool = False):
    what = "an integer" if kind is int else "a number"
    bound = f"{'>' if strict else '>='} {least}"
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}") from None
    if not (value > least if strict else value >= least):  # NaN too
        raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (tokens, documents, sequences, steps, repeats, processes)."""
    return _at_least(text, int, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (loader workers, where 0 reads in the main process)."""
    return _at_least(text, int, 0)


def positive_float(text: str) -> float:
    """A number > 0 (a sampling temperature)."""
    return _at_least(text, float, 0, strict=True)


def non_negative_float(text: str) -> float:
    """A number >= 0 (a penalty weight)."""
    return _at_least(text, float, 0)
