"""Pressure stall information (PSI): the share of time tasks waited for CPU or memory.

Format (``cpu.pressure``, ``/proc/pressure/cpu``)::

    some avg10=1.53 avg60=0.80 avg300=0.20 total=123456
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""

from __future__ import annotations

from pathlib import Path


def parse_some_avg10(text: str) -> float | None:
    """The ``some avg10`` percentage (0..100), or None when the text has none."""
    for line in text.splitlines():
        if line.startswith("some "):
            for part in line.split()[1:]:
                key, _, value = part.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def read_some_avg10(path: Path) -> float | None:
    """``some avg10`` of a pressure file; None when the kernel does not offer it there."""
    try:
        return parse_some_avg10(path.read_text())
    except OSError:
        return None


def node_pressure(proc: Path = Path("/proc")) -> tuple[float | None, float | None]:
    """Node-wide (cpu, memory) ``some avg10`` from ``/proc/pressure``; None where missing."""
    return read_some_avg10(proc / "pressure" / "cpu"), read_some_avg10(proc / "pressure" / "memory")
