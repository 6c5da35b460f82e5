"""mooncakefs.units: human sizes <-> bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mooncakefs.errors import InvalidArgument
from mooncakefs.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("10GB", 10 * 10**9),
        ("1KiB", 1024),
        ("1kB", 1000),
        ("4k", 4096),
        ("64MiB", 64 * 2**20),
        ("1TiB", 2**40),
        ("100", 100),
        ("0", 0),
        ("7B", 7),
        (" 3 MiB ", 3 * 2**20),
        ("1.5KiB", 1536),
        ("512mib", 512 * 2**20),
    ],
)
def test_parse_size_strings(text, expected):
    assert parse_size(text) == expected
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 4096, 2**20, 10**9, 2**40 + 7])
def test_parse_size_ints_pass_through(n):
    assert parse_size(n) == n


@pytest.mark.parametrize(
    "text",
    ["", "abc", "MiB", "12XB", "1.2.3MiB", "-5MiB", "--1", "5 MiB MiB", "0x10", "ten GB", "1e3", "5 Mi B"],
)
def test_parse_size_bad_strings(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("n", [-1, -(2**20)])
def test_parse_size_negative_int(n):
    with pytest.raises(ValueError):
        parse_size(n)


@pytest.mark.parametrize("bad", [None, 1.5, [1], b"1MiB"])
def test_parse_size_wrong_type(bad):
    with pytest.raises((TypeError, ValueError)):
        parse_size(bad)


def test_parse_size_bool_is_not_a_size():
    with pytest.raises((TypeError, ValueError)):
        parse_size(True)


def test_parse_size_error_message_names_the_input():
    with pytest.raises(ValueError, match="bogus"):
        parse_size("bogus")


@pytest.mark.parametrize("bad", ["lots", -1, None, True])
def test_a_bad_size_is_invalid_argument_as_every_bad_argument_is(bad):
    """``open(dram="lots")`` used to raise a bare ValueError, outside ``mooncakefs.errors``."""
    with pytest.raises(InvalidArgument):
        parse_size(bad, what="dram")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (100, "100B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (512 * 2**20, "512MiB"),
        (2 * 2**30, "2GiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 4096, 64 * 2**20, 512 * 2**20, 2**30, 3 * 2**40])
def test_format_parse_round_trip_exact_sizes(n):
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=2**50))
def test_format_size_round_trip_is_close(n):
    text = format_size(n)
    assert isinstance(text, str)
    back = parse_size(text)
    # three significant digits: within 0.5% (plus rounding of tiny values)
    assert abs(back - n) <= n * 0.005 + 1  # 3 significant digits, then int() truncation


@pytest.mark.parametrize("n", [1000, 1023, 1000 * 1024, 1023 * 1024, 1000 * 2**20, 1023 * 2**30])
def test_format_size_between_1000_and_1023_units_is_readable(n):
    """Values from 1000 to 1023 of a unit must not come out in exponent notation ('1e+03KiB')."""
    text = format_size(n)
    assert "e" not in text.lower().rstrip("kmgtib"), text
    assert abs(parse_size(text) - n) <= n * 0.005 + 1
