"""Sizes and rates as people write them, and the one way virtman prints them."""

from __future__ import annotations

import pytest

from virtman.errors import ConfigError
from virtman.sizes import binary_unit, format_rate, format_size, parse_link_rate, parse_size


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (256 << 10, "256.0 KiB"), (15 << 30, "15.0 GiB"), (3 << 40, "3.0 TiB"),
    (5 << 50, "5120.0 TiB"),  # no unit above TiB
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_binary_unit_is_the_largest_reached() -> None:
    assert binary_unit(1023) == ("B", 1)
    assert binary_unit(1 << 20) == ("MiB", 1 << 20)
    assert binary_unit((1 << 30) - 1) == ("MiB", 1 << 20)
    assert binary_unit(-(2 << 30)) == ("GiB", 1 << 30)


@pytest.mark.parametrize("text", ["256K", "15G", "4096", "1.5M", "2TiB", "64 KB"])
def test_parsed_sizes_print_back(text: str) -> None:
    n = parse_size(text)
    value, unit = format_size(n).split()
    assert parse_size(f"{value}{unit[0] if unit != 'B' else ''}") == n


@pytest.mark.parametrize("text", ["", "K", "1.5", "-1M", "12X", "1.0000001K"])
def test_bad_sizes_say_what_is_wrong(text: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text)


def test_rates() -> None:
    assert parse_link_rate("1gbit") == 125_000_000
    assert format_rate(parse_link_rate("100mbit")) == "100 Mbit/s"
    assert format_rate(125_000_000) == "1 Gbit/s"
    with pytest.raises(ConfigError, match="above zero"):
        parse_link_rate("0mbit")
