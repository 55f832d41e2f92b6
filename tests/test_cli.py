"""The scripts' argparse types and token counts: every bad value refused with the value named."""

from __future__ import annotations

import argparse

import pytest

from acomp.cli import non_negative_float, positive_int
from acomp.data.recipe import parse_count


@pytest.mark.parametrize("text", ["nan", "-0.5", "x"])
def test_non_negative_float_refuses_nan_and_negatives(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number >= 0, got"):
        non_negative_float(text)
    assert non_negative_float("0") == 0.0 and positive_int("3") == 3


@pytest.mark.parametrize("text", ["inf", "1e400", "-inf", "lots"])
def test_a_token_count_that_is_no_number_is_a_value_error(text):
    with pytest.raises(ValueError, match=r"--max-tokens: (cannot read|token count must be >= 0)"):
        parse_count(text, "--max-tokens")
    assert parse_count("2M", "--max-tokens") == 2_000_000
