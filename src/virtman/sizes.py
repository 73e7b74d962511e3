"""Byte sizes as people write them: ``4096``, ``256K``, ``1M``, ``15G``, ``1.5GiB``."""

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


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
