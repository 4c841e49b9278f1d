"""Tests for dsv2.utils."""

import pytest

from dsv2.utils import parse_size


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 10**5 and parse_size("1GiB") == 2**30
    assert parse_size(" 1.5 MiB ") == 3 * 2**19 and parse_size("42") == 42 and parse_size(7) == 7
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("lots")
