"""Units and the parsing of human-written config values: sizes ("512MiB") into bytes,
durations ("5m") into seconds, listen addresses ("0.0.0.0:9642") into host and port.

The binary size constants live here once (``policies`` keeps its own ``GIB`` in
``policies.prices``: the pure core imports nothing of ``colocate``).
"""

from __future__ import annotations

import re

from colocate.errors import ConfigError

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B?)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "p": 1024**5,
    "pb": 1000**5,
    "pib": 1024**5,
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


def parse_listen(
    listen: str, default_port: int | None = None, *, key: str | None = None
) -> tuple[str, int]:
    """(host, port) from ``HOST:PORT``, ``[v6]:PORT``, ``:PORT`` or, when there is a
    ``default_port``, a bare ``HOST``.

    ``:PORT`` means every IPv4 address (``0.0.0.0``), as in Prometheus and Go; write
    ``127.0.0.1:PORT`` for this host only. Port 0 lets the kernel pick one. A value that
    cannot be read raises ConfigError naming it (and ``key``, the config entry).
    """
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or "]" in port_text:  # no port: "node1" or "[::1]"
        if default_port is None:
            raise ConfigError(
                f"listen address {listen!r} has no port; write it like 0.0.0.0:9642", key=key
            )
        host, port_text = text, str(default_port)
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"cannot read listen address {listen!r}; write it like 127.0.0.1:8642 "
            "(HOST:PORT, port 0-65535)",
            key=key,
        )
    return host.strip("[]") or "0.0.0.0", int(port_text)
