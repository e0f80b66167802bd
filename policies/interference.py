"""How much a batch job slows when functions run on its node's idle cores: a site's table.

A table holds one cell per (batch kernel, function kind): the job's runtime with the functions
over its runtime alone (``slowdown`` 1.12 = 12 % slower), with a confidence interval over
repeated runs, measured at ``function_share`` of the node's cores held by functions.
``colocate calibrate`` measures one on a site's own node; :data:`IPDPS24` (Copik et al.,
IPDPS 2024: LULESH -1.1 % to +3.1 %, MILC +3.0 % to +12.4 % with functions on the spare
half of the node) stands in for sites that have not calibrated.

Each kernel has a kind: ``memory_bandwidth`` (STREAM, MILC), ``compute`` (dense matmul,
LULESH) or ``cache_latency`` (pointer chase). The replay's two sensitivity classes read
their ranges from it (:meth:`InterferenceTable.class_ranges`: memory-bound jobs from the
memory-bandwidth and cache-latency kernels, compute-bound jobs from the compute kernels).

The guard reads :meth:`InterferenceTable.typical_slowdown` (the mean over the cells: a node
runs jobs and functions of every kind) and caps the function share of a node where it would
cost more than ``limits.slowdown_budget`` (:func:`guarded_limits`), assuming slowdown grows
linearly with the share of the node's cores functions hold, as the replay does.

Pure: :meth:`InterferenceTable.from_mapping` takes the parsed JSON; loading the file is the
caller's (``colocate.config.load_interference_table``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.limits import Limits

FORMAT = "colocate-interference/1"
KINDS = ("memory_bandwidth", "compute", "cache_latency")
MEMORY_BOUND_KINDS = ("memory_bandwidth", "cache_latency")


@dataclass(frozen=True, slots=True)
class Cell:
    """One kernel x function measurement: slowdown ratios (with / alone), ``n`` repeats.

    ``n`` is 0 for published figures whose repeats are unknown.
    """

    kernel: str
    kind: str
    function: str
    slowdown: float
    ci_low: float
    ci_high: float
    n: int


@dataclass(frozen=True, slots=True)
class InterferenceTable:
    """Measured slowdowns of one site (see the module docstring); ``source`` says where from."""

    cells: tuple[Cell, ...]
    function_share: float
    source: str = ""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "table") -> InterferenceTable:
        """A table from parsed JSON (``colocate calibrate --out`` writes it); ValueError naming
        the field and what to do for anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ValueError(
                f"{where}: format {fmt!r} is not {FORMAT!r}; write it with `colocate calibrate --out`"
            )
        share: Any = data.get("function_share")
        if not _number(share) or not 0 < float(share) <= 1:
            raise ValueError(
                f"{where}: function_share must be the share of node cores functions held, in (0, 1]"
            )
        raw = data.get("cells")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: cells must be a non-empty list")
        cells = []
        seen = set()
        for i, item in enumerate(raw):
            at = f"{where}: cells[{i}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{at}: expected an object")
            for key in ("kernel", "kind", "function"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise ValueError(f"{at}.{key}: expected a non-empty string")
            if item["kind"] not in KINDS:
                raise ValueError(f"{at}.kind: {item['kind']!r} is not one of {', '.join(KINDS)}")
            for key in ("slowdown", "ci_low", "ci_high"):
                if not _number(item.get(key)) or float(item[key]) <= 0:
                    raise ValueError(f"{at}.{key}: expected a ratio > 0 (with / alone)")
            if not float(item["ci_low"]) <= float(item["slowdown"]) <= float(item["ci_high"]):
                raise ValueError(f"{at}: expected ci_low <= slowdown <= ci_high")
            n = item.get("n", 0)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{at}.n: expected a whole number of repeats >= 0")
            pair = (item["kernel"], item["function"])
            if pair in seen:
                raise ValueError(f"{at}: a second cell for kernel {pair[0]!r} x {pair[1]!r}")
            seen.add(pair)
            cells.append(
                Cell(
                    item["kernel"],
                    item["kind"],
                    item["function"],
                    float(item["slowdown"]),
                    float(item["ci_low"]),
                    float(item["ci_high"]),
                    n,
                )
            )
        source: Any = data.get("source", "")
        return cls(tuple(cells), float(share), source if isinstance(source, str) else "")

    def to_mapping(self) -> dict[str, Any]:
        """The JSON form :meth:`from_mapping` reads."""
        return {
            "format": FORMAT,
            "source": self.source,
            "function_share": self.function_share,
            "cells": [
                {
                    "kernel": c.kernel,
                    "kind": c.kind,
                    "function": c.function,
                    "slowdown": c.slowdown,
                    "ci_low": c.ci_low,
                    "ci_high": c.ci_high,
                    "n": c.n,
                }
                for c in self.cells
            ],
        }

    def lookup(self, kernel: str, function: str | None = None) -> Cell:
        """The cell of ``kernel`` (a kernel name or a kind) with ``function``; with no or an
        unmeasured function, the kernel's worst cell. KeyError for an unknown kernel."""
        mine = [c for c in self.cells if kernel in (c.kernel, c.kind)]
        if not mine:
            known = sorted({c.kernel for c in self.cells} | {c.kind for c in self.cells})
            raise KeyError(f"no kernel {kernel!r} in the table; known: {', '.join(known)}")
        exact = [c for c in mine if c.function == function]
        return exact[0] if exact else max(mine, key=lambda c: c.slowdown)

    def typical_slowdown(self) -> float:
        """Mean slowdown fraction (0.05 = 5 %) over the cells, at ``function_share``."""
        return sum(c.slowdown - 1.0 for c in self.cells) / len(self.cells)

    def class_ranges(self) -> dict[str, tuple[float, float]]:
        """``{"memory_bound": (lo, hi), "compute_bound": (lo, hi)}``: slowdown fractions from
        the lowest ``ci_low`` to the highest ``ci_high`` of the class's cells (which function
        co-runs, and the measurement's own uncertainty). A class with no kernel takes the
        other's range."""
        out: dict[str, tuple[float, float]] = {}
        for name, memory_bound in (("memory_bound", True), ("compute_bound", False)):
            cells = [c for c in self.cells if (c.kind in MEMORY_BOUND_KINDS) == memory_bound]
            if cells:
                low = min(c.ci_low for c in cells) - 1.0
                high = max(c.ci_high for c in cells) - 1.0
                out[name] = (round(low, 9), round(high, 9))
        if len(out) == 1:
            only = next(iter(out.values()))
            out.setdefault("memory_bound", only)
            out.setdefault("compute_bound", only)
        return out


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


IPDPS24 = InterferenceTable(
    (
        Cell("lulesh", "compute", "ipdps24-functions", 1.010, 0.989, 1.031, 0),
        Cell("milc", "memory_bandwidth", "ipdps24-functions", 1.077, 1.030, 1.124, 0),
    ),
    0.5,
    "Copik et al., 'Software Resource Disaggregation for HPC with Serverless Computing', "
    "IPDPS 2024 (ranges over the co-run functions; slowdown = midpoint)",
)
"""The published figures: the default for a site that has not calibrated."""


def max_function_share(table: InterferenceTable, budget: float) -> float:
    """The largest share of a node's cores functions may hold while the table's typical
    slowdown, scaled linearly from its ``function_share``, stays within ``budget`` (a
    fraction); 1.0 when functions cost nothing."""
    typical = table.typical_slowdown()
    if typical <= 0.0:
        return 1.0
    return min(1.0, budget * table.function_share / typical)


def guarded_limits(limits: Limits, table: InterferenceTable) -> Limits:
    """``limits`` with ``max_function_share`` lowered to what the table allows within
    ``limits.slowdown_budget`` (never raised). On a node whose cap rounds down to no core the
    guard offers nothing while batch jobs run."""
    share = max_function_share(table, limits.slowdown_budget)
    if share >= limits.max_function_share:
        return limits
    return limits.model_copy(update={"max_function_share": share})
