"""Byte sizes and link rates as people write them: ``256K``, ``15G``; ``1gbit``, ``100mbit``."""

from __future__ import annotations

import re

from virtman.errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a size with an optional binary unit (K, M, G, T; KiB and KB alike)."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"size {text!r}: expected a number with an optional K, M, G or T")
    number, unit = match.group(1), match.group(2).upper()
    value = float(number) * _UNITS[unit]
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


_BINARY_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def binary_unit(n: float) -> tuple[str, int]:
    """The largest binary unit that ``n`` bytes reach (``("B", 1)`` below 1 KiB)."""
    for unit, scale in _BINARY_UNITS:
        if abs(n) >= scale:
            return unit, scale
    return "B", 1


def format_size(n: float) -> str:
    """``n`` bytes in the largest binary unit it reaches: ``512 B``, ``1.5 MiB``, ``2.0 GiB``
    (the one way every virtman command prints a size)."""
    unit, scale = binary_unit(n)
    return f"{n:.0f} B" if scale == 1 else f"{n / scale:.1f} {unit}"


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)\s*(bit/s|bits/s|bit|bits|bps)?\s*$",
                   re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_link_rate(text: str) -> float:
    """A link rate in bits per second (``1gbit``, ``100mbit``, ``10Gbit/s``, ``2.5gbps``,
    a bare number is bits per second; decimal units) as bytes per second."""
    match = _RATE.match(text)
    if match is None:
        raise ConfigError(
            f"link rate {text!r}: expected a number of bits per second with an optional"
            " k, m, g or t and 'bit', like 1gbit or 100mbit"
        )
    bits = float(match.group(1)) * _RATE_UNITS[match.group(2).lower()]
    if bits <= 0:
        raise ConfigError(f"link rate {text!r} must be above zero")
    return bits / 8


def format_rate(bytes_per_second: float) -> str:
    bits = bytes_per_second * 8
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"
