"""Standard Workload Format (Parallel Workloads Archive): plain or gzip.

18 whitespace-separated fields per job, ``;`` header comments (``; MaxNodes: 240``). Field
numbering below is the standard 1-based one. Missing values are -1.

Fast path: the whole body goes through one ``numpy`` conversion; only when that fails is
the file walked line by line to name the bad line and field.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from colocate.errors import TraceFormatError
from traces.jobs import JobTrace
from traces.textfile import read_text

log = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = (
    "job_number",  # 1
    "submit_time",  # 2, s since UnixStartTime
    "wait_time",  # 3, s
    "run_time",  # 4, s
    "allocated_processors",  # 5
    "average_cpu_time_used",  # 6, s per processor
    "used_memory",  # 7, KB per processor (average)
    "requested_processors",  # 8
    "requested_time",  # 9, s
    "requested_memory",  # 10, KB per processor
    "status",  # 11
    "user_id",  # 12
    "group_id",  # 13
    "executable_number",  # 14
    "queue_number",  # 15
    "partition_number",  # 16
    "preceding_job_number",  # 17
    "think_time",  # 18
)
NFIELDS = len(FIELDS)
KIB = 1024


def _header(lines: list[str]) -> dict[str, str]:
    header: dict[str, str] = {}
    for line in lines:
        body = line.lstrip(";").strip()
        key, sep, value = body.partition(":")
        if sep and key.strip() and key.strip() not in header:
            header[key.strip()] = value.strip()
    return header


def _header_int(header: dict[str, str], key: str, path: str) -> int:
    value = header.get(key, "").split()
    if not value:
        return 0
    try:
        return int(float(value[0]))
    except ValueError:
        raise TraceFormatError(
            f"header {key!r} is {value[0]!r}, expected a number", path=path, field=key
        ) from None


def _eighteen_per_line(body: str, n_lines: int) -> bool:
    """True when every line of ``body`` holds exactly 18 tokens (vectorised count)."""
    if not n_lines:
        return True
    raw = np.frombuffer(body.encode("latin-1", "replace"), dtype=np.uint8)
    space = raw <= 32  # space, tab, CR, LF (the body holds no other control bytes)
    token_starts = np.flatnonzero(~space[1:] & space[:-1]) + 1
    if raw.size and not space[0]:
        token_starts = np.concatenate(([0], token_starts))
    line_ends = np.append(np.flatnonzero(raw == 10), raw.size)
    counts = np.diff(np.searchsorted(token_starts, line_ends), prepend=0)
    return bool(counts.size == n_lines and np.all(counts == NFIELDS))


def _locate_error(path: str, lines: list[str]) -> TraceFormatError:
    """Walk the lines to find the first that does not hold 18 numbers."""
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        parts = line.split()
        if len(parts) != NFIELDS:
            return TraceFormatError(
                f"{len(parts)} fields, SWF lines have {NFIELDS}",
                path=path,
                line=number,
                expected_format="swf",
            )
        for i, part in enumerate(parts):
            try:
                float(part)
            except ValueError:
                return TraceFormatError(
                    f"{part!r} is not a number",
                    path=path,
                    line=number,
                    field=f"{i + 1} ({FIELDS[i]})",
                    expected_format="swf",
                )
    return TraceFormatError("unreadable SWF body", path=path, expected_format="swf")


def read_swf(path: str | Path) -> JobTrace:
    """Jobs of an SWF file; jobs that never ran (run time <= 0 or no processors) are skipped.

    Times become epoch seconds using the header's ``UnixStartTime`` (0 when absent).
    ``memory_alloc_bytes`` comes from requested memory (field 10, KB per processor),
    ``memory_used_bytes`` from used memory (field 7, KB per processor, an average), and
    ``cpu_used_ratio`` from average CPU time (field 6) over run time.
    """
    p = str(path)
    text = read_text(path)
    lines = text.splitlines()
    header_lines = [line for line in lines if line.lstrip().startswith(";")]
    body_lines = [line for line in lines if line.strip() and not line.lstrip().startswith(";")]
    if not body_lines and not header_lines:
        raise TraceFormatError("empty file, expected an SWF trace", path=p, expected_format="swf")
    body = "\n".join(body_lines)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # older numpy warns, newer raises
            flat = np.fromstring(body, dtype=np.float64, sep=" ") if body_lines else np.zeros(0)
    except ValueError:
        raise _locate_error(p, lines) from None
    if flat.size != len(body_lines) * NFIELDS or not _eighteen_per_line(body, len(body_lines)):
        raise _locate_error(p, lines)
    rows = flat.reshape(-1, NFIELDS)
    if not header_lines and rows.shape[0] == 0:
        raise TraceFormatError("no SWF header and no job lines", path=p, expected_format="swf")
    header = _header(header_lines)
    unix_start = float(_header_int(header, "UnixStartTime", p))
    run = rows[:, 3]
    procs = rows[:, 4]
    procs = np.where(procs > 0, procs, rows[:, 7])  # some logs only fill the request
    never_ran = run <= 0
    no_cores = (procs <= 0) & ~never_ran
    keep = ~(never_ran | no_cores)
    rows, run, procs = rows[keep], run[keep], procs[keep]
    wait = np.maximum(rows[:, 2], 0.0)
    submit = rows[:, 1] + unix_start
    start = submit + wait
    cpu = rows[:, 5]
    with np.errstate(divide="ignore", invalid="ignore"):
        cpu_ratio = np.where(cpu >= 0, np.clip(cpu / run, 0.0, 1.0), np.nan)
    used_mem = np.where(rows[:, 6] > 0, rows[:, 6] * KIB * procs, np.nan)
    req_mem = np.where(rows[:, 9] > 0, rows[:, 9] * KIB * procs, np.nan)
    max_nodes = _header_int(header, "MaxNodes", p)
    max_procs = _header_int(header, "MaxProcs", p)
    skipped = {
        "never ran (run time <= 0)": int(never_ran.sum()),
        "no processors": int(no_cores.sum()),
    }
    log.info("read %d SWF jobs from %s (skipped %s)", rows.shape[0], p, skipped)
    return JobTrace(
        path=p,
        format="swf",
        job_id=rows[:, 0].astype(np.int64),
        submit_s=submit,
        start_s=start,
        end_s=start + run,
        cores=procs.astype(np.int64),
        nodes=np.full(rows.shape[0], -1, dtype=np.int64),
        memory_alloc_bytes=req_mem,
        cpu_used_ratio=cpu_ratio,
        memory_used_bytes=used_mem,
        max_nodes=max_nodes,
        max_procs=max_procs,
        unix_start_time=unix_start,
        header=header,
        skipped={k: v for k, v in skipped.items() if v},
        notes=("memory_used_bytes: SWF field 7, average per processor x processors",),
    )
