"""Parsing of human sizes and durations ("512MiB", "5m") into bytes and seconds."""

from __future__ import annotations

import re

from colocate.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B?)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
    "p": 1024**5, "pb": 1000**5, "pib": 1024**5,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(value: str | int | float) -> int:
    """Bytes from ``512MiB``, ``1G`` (binary), ``1GB`` (decimal) or a plain number of bytes."""
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"size {value!r} is negative")
        return int(value)
    m = _SIZE.match(value)
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _SIZE_FACTORS:
        raise ConfigError(f"cannot read size {value!r}; write it like 512MiB, 2GiB or 1048576")
    return int(float(m.group(1)) * _SIZE_FACTORS[unit])


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``250ms``, ``30s``, ``5m``, ``2h``, ``1d`` or a plain number of seconds."""
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"duration {value!r} is negative")
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ConfigError(f"cannot read duration {value!r}; write it like 250ms, 30s, 5m or 2h")
    return float(m.group(1)) * _DURATION_FACTORS[(m.group(2) or "").lower()]
