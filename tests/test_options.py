"""Values typed on the command line: byte sizes and dtype names (twamerge/options.py)."""

from __future__ import annotations

import pytest
import torch

from twamerge.errors import InvalidArgumentError
from twamerge.options import dtype_name, parse_dtype, parse_size


@pytest.mark.parametrize("text, size", [
    ("1000000", 1_000_000),
    ("500MB", 500_000_000),
    ("500mb", 500_000_000),
    ("2GiB", 2 * 1024**3),
    ("5G", 5_000_000_000),
    ("1.5KiB", 1536),
    (" 600B ", 600),
    ("1k", 1000),
    (4096, 4096),
    (None, None),
])
def test_sizes_are_decimal_or_binary_by_their_suffix(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [
    ("2 GB of data", "is not a byte count"),
    ("GB", "is not a byte count"),
    ("-5MB", "is not a byte count"),
    ("0", "must be positive"),
    (0, "must be positive"),
])
def test_a_size_that_is_not_a_positive_byte_count_is_refused(text, message):
    with pytest.raises(InvalidArgumentError, match=message):
        parse_size(text)


@pytest.mark.parametrize("name, dtype", [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("half", torch.float16),
    ("float32", torch.float32), ("torch.float64", torch.float64), ("DOUBLE", torch.float64),
    ("auto", None), ("", None), (None, None), (torch.float16, torch.float16),
])
def test_dtype_names_and_aliases(name, dtype):
    assert parse_dtype(name) is dtype


def test_a_dtype_that_is_not_floating_is_refused_naming_it():
    with pytest.raises(InvalidArgumentError, match="unknown dtype 'int8'; expected one of float32"):
        parse_dtype("int8")
    with pytest.raises(InvalidArgumentError, match="output dtype int64 is not a floating dtype"):
        parse_dtype(torch.int64)


def test_dtype_name_drops_the_torch_prefix():
    assert dtype_name(torch.bfloat16) == "bfloat16" and parse_dtype(dtype_name(torch.float16)) is torch.float16
