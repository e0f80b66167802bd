"""Azure Functions traces (Azure Public Dataset, CC-BY 4.0) as per-minute demand.

- 2019 (Shahrad et al., ATC'20): ``invocations`` (``HashOwner,HashApp,HashFunction,Trigger,
  <minute>...``, counts per minute), ``durations`` (``HashOwner,HashApp,HashFunction,Average,
  Count,Minimum,Maximum,percentile_Average_*``, milliseconds) and ``memory``
  (``HashOwner,HashApp,SampleCount,AverageAllocatedMb,...``, per app; In-Vitro's subset puts
  ``HashFunction`` first and repeats the app's memory per function).
- 2021 (Zhang et al., SOSP'21): invocation records ``app,func,end_timestamp,duration``
  (seconds from the trace start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from colocate.errors import TraceFormatError
from colocate.units import MIB
from traces.textfile import read_text

log = logging.getLogger(__name__)
DEFAULT_MEMORY_BYTES = (
    58 * MIB
)  # 2021 trace has no memory: median AverageAllocatedMb of the 2019 subset


@dataclass(frozen=True, slots=True)
class FaasTrace:
    """Function demand per minute.

    - ``invocations``: int64 array (functions x minutes), invocations started in each minute.
    - ``duration_s``: float64 per function, average execution time, seconds.
    - ``memory_bytes``: float64 per function, average memory of one instance, bytes.
    - ``first_minute``: minute of the day of column 0 (Azure 2019 columns are minutes of a day).
    """

    path: str
    format: str
    function_ids: tuple[str, ...]
    invocations: npt.NDArray[np.int64]
    duration_s: npt.NDArray[np.float64]
    memory_bytes: npt.NDArray[np.float64]
    first_minute: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def minutes(self) -> int:
        return int(self.invocations.shape[1])

    @property
    def total_invocations(self) -> int:
        return int(self.invocations.sum())


def _find(directory: Path, stem: str) -> Path:
    matches = sorted(p for p in directory.iterdir() if p.name.startswith(stem) and ".csv" in p.name)
    if not matches:
        matches = sorted(p for p in directory.iterdir() if stem in p.name and ".csv" in p.name)
    if not matches:
        raise TraceFormatError(
            f"no {stem}*.csv[.gz] in this directory; expected the Azure 2019 files",
            path=str(directory),
            expected_format="azure2019",
        )
    return matches[0]


def _rows(
    path: Path, expected: str, required: tuple[str, ...]
) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if not lines:
        raise TraceFormatError(
            f"empty file; expected {expected}", path=str(path), expected_format=expected
        )
    header = [h.strip() for h in lines[0].split(",")]
    missing = [r for r in required if r not in header]
    if missing:
        raise TraceFormatError(
            f"header lacks {', '.join(missing)}; expected {expected}",
            path=str(path),
            line=1,
            expected_format=expected,
        )
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        if len(parts) != len(header):
            raise TraceFormatError(
                f"{len(parts)} fields, the header has {len(header)}",
                path=str(path),
                line=number,
                expected_format=expected,
            )
        rows.append(parts)
    return header, rows


def _float(
    path: Path, rows: list[list[str]], col: int, name: str, expected: str
) -> npt.NDArray[np.float64]:
    try:
        return np.array([r[col] for r in rows], dtype=np.float64)
    except ValueError:
        for number, r in enumerate(rows, start=2):
            try:
                float(r[col])
            except ValueError:
                raise TraceFormatError(
                    f"{r[col]!r} is not a number",
                    path=str(path),
                    line=number,
                    field=name,
                    expected_format=expected,
                ) from None
        raise


def read_azure2019(
    path: str | Path, durations: str | Path | None = None, memory: str | Path | None = None
) -> FaasTrace:
    """Azure 2019 demand from a directory holding the three files, or from their paths.

    Functions without a duration row get the median duration; without memory, the median
    memory (both noted in ``notes``).
    """
    p = Path(path)
    dur_path: Path | None
    mem_path: Path | None
    if p.is_dir():
        inv_path, dur_path, mem_path = (
            _find(p, "invocations"),
            _find(p, "durations"),
            _find(p, "memory"),
        )
    else:
        inv_path = p
        dur_path = Path(durations) if durations else None
        mem_path = Path(memory) if memory else None
        if dur_path is None or mem_path is None:
            for sibling in sorted(p.parent.iterdir()):
                if dur_path is None and "durations" in sibling.name:
                    dur_path = sibling
                if mem_path is None and "memory" in sibling.name:
                    mem_path = sibling
    fmt = "azure2019-invocations"
    header, rows = _rows(inv_path, fmt, ("HashFunction",))
    fcol = header.index("HashFunction")
    first = 4 if "Trigger" in header else fcol + 1
    try:
        minutes = [int(h) for h in header[first:]]
    except ValueError:
        raise TraceFormatError(
            "columns after HashFunction/Trigger must be minute numbers; expected Azure 2019 invocations",
            path=str(inv_path),
            line=1,
            expected_format=fmt,
        ) from None
    try:
        counts = np.array([r[first:] for r in rows], dtype=np.float64).astype(np.int64)
    except ValueError:
        for number, r in enumerate(rows, start=2):
            for i, value in enumerate(r[first:]):
                try:
                    float(value)
                except ValueError:
                    raise TraceFormatError(
                        f"{value!r} is not a count",
                        path=str(inv_path),
                        line=number,
                        field=header[first + i],
                        expected_format=fmt,
                    ) from None
        raise
    counts = counts.reshape(len(rows), len(minutes))
    ids = tuple(r[fcol] for r in rows)
    apps = tuple(r[header.index("HashApp")] for r in rows) if "HashApp" in header else ids
    notes: list[str] = []
    duration = np.full(len(ids), np.nan)
    if dur_path is not None:
        dfmt = "azure2019-durations"
        dh, drows = _rows(dur_path, dfmt, ("HashFunction", "Average"))
        avg = _float(dur_path, drows, dh.index("Average"), "Average", dfmt) / 1000.0
        by_fn = dict(zip((r[dh.index("HashFunction")] for r in drows), avg, strict=True))
        duration = np.array([by_fn.get(f, np.nan) for f in ids])
    memory_b = np.full(len(ids), np.nan)
    if mem_path is not None:
        mfmt = "azure2019-memory"
        mh, mrows = _rows(mem_path, mfmt, ("HashApp", "AverageAllocatedMb"))
        mb = (
            _float(mem_path, mrows, mh.index("AverageAllocatedMb"), "AverageAllocatedMb", mfmt)
            * MIB
        )
        key = "HashFunction" if "HashFunction" in mh else "HashApp"
        by_key = dict(zip((r[mh.index(key)] for r in mrows), mb, strict=True))
        memory_b = np.array(
            [
                by_key.get(f if key == "HashFunction" else a, np.nan)
                for f, a in zip(ids, apps, strict=True)
            ]
        )
    for name, values, default in (
        ("duration", duration, 1.0),
        ("memory", memory_b, float(DEFAULT_MEMORY_BYTES)),
    ):
        missing = ~np.isfinite(values)
        if missing.any():
            fill = float(np.nanmedian(values)) if (~missing).any() else default
            values[missing] = fill
            notes.append(
                f"{int(missing.sum())} functions without {name}: median {fill:.3g} assumed"
            )
    log.info("read %d Azure 2019 functions x %d minutes from %s", len(ids), len(minutes), inv_path)
    return FaasTrace(
        path=str(p),
        format="azure2019",
        function_ids=ids,
        invocations=counts,
        duration_s=np.maximum(duration, 0.001),
        memory_bytes=memory_b,
        first_minute=minutes[0] if minutes else 0,
        notes=tuple(notes),
    )


def read_azure2021(path: str | Path, memory_bytes: float = DEFAULT_MEMORY_BYTES) -> FaasTrace:
    """Azure 2021 invocation records binned per minute of their start (end - duration).

    The 2021 trace has no memory: every function gets ``memory_bytes`` (modelled; default
    the median app memory of the Azure 2019 subset).
    """
    p = Path(path)
    fmt = "azure2021"
    header, rows = _rows(p, fmt, ("app", "func", "end_timestamp", "duration"))
    end = _float(p, rows, header.index("end_timestamp"), "end_timestamp", fmt)
    dur = _float(p, rows, header.index("duration"), "duration", fmt)
    bad = np.flatnonzero((dur < 0) | (end < 0))
    if bad.size:
        raise TraceFormatError(
            "negative time",
            path=str(p),
            line=int(bad[0]) + 2,
            field="duration",
            expected_format=fmt,
        )
    fcol, acol = header.index("func"), header.index("app")
    keys = [f"{r[acol]}/{r[fcol]}" for r in rows]
    ids = tuple(sorted(set(keys)))
    index = {k: i for i, k in enumerate(ids)}
    fn = np.array([index[k] for k in keys], dtype=np.int64)
    start_min = np.maximum(np.floor((end - dur) / 60.0), 0).astype(np.int64)
    n_min = int(start_min.max()) + 1 if start_min.size else 1
    counts = np.zeros((len(ids), n_min), dtype=np.int64)
    np.add.at(counts, (fn, start_min), 1)
    total = np.bincount(fn, weights=dur, minlength=len(ids))
    n = np.bincount(fn, minlength=len(ids))
    log.info("read %d Azure 2021 records (%d functions) from %s", len(rows), len(ids), p)
    return FaasTrace(
        path=str(p),
        format="azure2021",
        function_ids=ids,
        invocations=counts,
        duration_s=np.maximum(total / np.maximum(n, 1), 0.001),
        memory_bytes=np.full(len(ids), float(memory_bytes)),
        first_minute=0,
        notes=(
            f"memory per instance modelled: {memory_bytes / MIB:.0f} MiB (the 2021 trace has none)",
        ),
    )
