"""Piz Daint ``sinfo`` utilization samples (Copik et al., IPDPS 2024; data of their artifact).

Columns: ``,date,idle_cpus,partially_idle_cpus,partially_free_mem,free_mem,allocated_nodes,
idle_nodes,other_nodes,total_nodes``; fractions 0..1, ``date`` as ``dd-mm-yy HH:MM:SS``.
``idle_cpus``: cores of fully idle nodes / all cores; ``partially_free_mem``: free memory
inside allocated nodes / all memory; ``free_mem``: memory of idle nodes / all memory.
Rows are not in time order inside a file; :func:`read_daint` sorts them.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from colocate.errors import TraceFormatError
from traces.textfile import read_text

log = logging.getLogger(__name__)
COLUMNS = (
    "date",
    "idle_cpus",
    "partially_idle_cpus",
    "partially_free_mem",
    "free_mem",
    "allocated_nodes",
    "idle_nodes",
    "other_nodes",
    "total_nodes",
)
_FRACTIONS = ("idle_cpus", "partially_idle_cpus", "partially_free_mem", "free_mem")


@dataclass(frozen=True, slots=True)
class DaintUtilization:
    """Cluster-level samples in time order; ``t`` epoch seconds (UTC), fractions 0..1."""

    paths: tuple[str, ...]
    t: npt.NDArray[np.float64]
    idle_cpus: npt.NDArray[np.float64]
    partially_idle_cpus: npt.NDArray[np.float64]
    partially_free_mem: npt.NDArray[np.float64]
    free_mem: npt.NDArray[np.float64]
    idle_nodes: npt.NDArray[np.float64]
    total_nodes: npt.NDArray[np.float64]

    def summary(self) -> dict[str, float]:
        """Idle cores and free memory (partially free + free) in percent: mean, median, p95, min."""
        free_total = (self.partially_free_mem + self.free_mem) * 100.0
        idle = self.idle_cpus * 100.0
        return {
            "samples": float(self.t.size),
            "idle_cores_mean_pct": float(idle.mean()),
            "idle_cores_median_pct": float(np.median(idle)),
            "idle_cores_p95_pct": float(np.percentile(idle, 95)),
            "free_memory_mean_pct": float(free_total.mean()),
            "free_memory_median_pct": float(np.median(free_total)),
            "free_memory_min_pct": float(free_total.min()),
            "idle_nodes_mean": float(self.idle_nodes.mean()),
            "idle_nodes_median": float(np.median(self.idle_nodes)),
        }


def _read_one(path: Path) -> list[list[str]]:
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise TraceFormatError(
            "empty file; expected Daint sinfo utilization CSV",
            path=str(path),
            expected_format="daint",
        )
    header = [h.strip() for h in lines[0].split(",")]
    if header[1:] != list(COLUMNS):
        raise TraceFormatError(
            f"header is {lines[0][:80]!r}; expected ',{','.join(COLUMNS)}' (Daint sinfo utilization)",
            path=str(path),
            line=1,
            expected_format="daint",
        )
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        if len(parts) != len(header):
            raise TraceFormatError(
                f"{len(parts)} fields, the header has {len(header)}",
                path=str(path),
                line=number,
                expected_format="daint",
            )
        try:
            when = (
                dt.datetime.strptime(parts[1], "%d-%m-%y %H:%M:%S")
                .replace(tzinfo=dt.UTC)
                .timestamp()
            )
        except ValueError:
            raise TraceFormatError(
                f"{parts[1]!r} is not dd-mm-yy HH:MM:SS",
                path=str(path),
                line=number,
                field="date",
                expected_format="daint",
            ) from None
        for name, value in zip(COLUMNS[1:], parts[2:], strict=True):
            try:
                number_value = float(value)
            except ValueError:
                raise TraceFormatError(
                    f"{value!r} is not a number",
                    path=str(path),
                    line=number,
                    field=name,
                    expected_format="daint",
                ) from None
            if name in _FRACTIONS and not 0.0 <= number_value <= 1.0:
                raise TraceFormatError(
                    f"{value} is outside 0..1",
                    path=str(path),
                    line=number,
                    field=name,
                    expected_format="daint",
                )
        rows.append([str(when), *parts[2:]])
    return rows


def read_daint(path: str | Path) -> DaintUtilization:
    """Samples from one CSV (plain or .gz) or a directory of ``out_*.csv[.gz]``."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if ".csv" in f.name)
        if not files:
            raise TraceFormatError(
                "no .csv files in this directory; expected Daint out_*.csv",
                path=str(p),
                expected_format="daint",
            )
    else:
        files = [p]
    rows: list[list[str]] = []
    for f in files:
        rows.extend(_read_one(f))
    data = np.array(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    data = data[np.argsort(data[:, 0], kind="stable")]
    log.info("read %d Daint samples from %d files", data.shape[0], len(files))
    return DaintUtilization(
        paths=tuple(str(f) for f in files),
        t=data[:, 0],
        idle_cpus=data[:, 1],
        partially_idle_cpus=data[:, 2],
        partially_free_mem=data[:, 3],
        free_mem=data[:, 4],
        idle_nodes=data[:, 6],
        total_nodes=data[:, 8],
    )
