"""Slurm accounting: ``sacct --json`` and ``sacct -P`` (pipe-separated) output.

Field names follow Slurm 22.05's documentation (``sacct --helpformat``; the dbv0.0.38 JSON).
Newer releases wrap numbers as ``{"set": true, "number": N}``; both shapes are read.

Units in Slurm's output: memory in ``tres.allocated``/``required.memory`` and ``ReqMem`` is MB
(MiB); step ``tres.requested.max`` memory and ``MaxRSS`` are bytes (MaxRSS with a K/M/G
suffix); CPU time is seconds (+ microseconds in JSON).

For ``sacct -P`` the useful columns are::

    sacct -a -P -X --format=JobIDRaw,Submit,Start,End,ElapsedRaw,AllocCPUS,NNodes,ReqMem,State

and, for measured usage, drop ``-X`` and add ``TotalCPU,MaxRSS,NTasks`` (step lines then carry
the memory). ``Start``/``End`` or ``ElapsedRaw``/``Elapsed`` and one of ``AllocCPUS``/``NCPUS``
are required.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from colocate.errors import TraceFormatError
from colocate.units import GIB, KIB, MIB, TIB
from traces.jobs import JobTrace
from traces.textfile import read_text

log = logging.getLogger(__name__)
_SIZE_FACTOR = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB, "P": 1024 * TIB}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGTP]?)([nc]?)$")
_DURATION = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)$")
_MISSING = {"", "Unknown", "None", "N/A", "INVALID"}


@dataclass(slots=True)
class _Job:
    job_id: int
    submit: float
    start: float
    end: float
    cores: int
    nodes: int
    mem_alloc: float
    cpu_seconds: float
    mem_used: float


def _num(value: Any) -> float | None:
    """A number from ``5`` or ``{"set": true, "number": 5}`` (Slurm >= 23.02); None if unset."""
    if isinstance(value, Mapping):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _seconds(value: Any) -> float:
    """Seconds from ``{"seconds": s, "microseconds": us}`` or a plain number."""
    if isinstance(value, Mapping) and "seconds" in value:
        return (
            float(_num(value.get("seconds")) or 0.0)
            + float(_num(value.get("microseconds")) or 0.0) / 1e6
        )
    return float(_num(value) or 0.0)


def _tres(items: Any, kind: str) -> float | None:
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, Mapping) and item.get("type") == kind:
            return _num(item.get("count"))
    return None


def _json_job(raw: Mapping[str, Any], path: str, index: int) -> _Job | None:
    where = f"jobs[{index}]"
    try:
        job_id = int(_num(raw["job_id"]) or 0)
        t = raw["time"]
        submit, start, end = _num(t.get("submission")), _num(t.get("start")), _num(t.get("end"))
    except (KeyError, TypeError, AttributeError):
        raise TraceFormatError(
            "missing job_id or time.{submission,start,end}",
            path=path,
            field=where,
            expected_format="sacct-json",
        ) from None
    if not start or not end or end <= start:
        return None  # pending, running or never started
    tres = raw.get("tres", {}) if isinstance(raw.get("tres"), Mapping) else {}
    allocated = tres.get("allocated")
    cores = _tres(allocated, "cpu") or _num(raw.get("required", {}).get("CPUs")) or 0
    if cores <= 0:
        return None
    nodes = _tres(allocated, "node") or _num(raw.get("allocation_nodes")) or -1
    mem_mb = _tres(allocated, "mem") or _num(raw.get("required", {}).get("memory"))
    cpu_seconds = _seconds(t.get("total")) if isinstance(t, Mapping) else 0.0
    mem_used = 0.0
    for step in raw.get("steps", []) or []:
        if not isinstance(step, Mapping):
            continue
        req = (
            step.get("tres", {}).get("requested", {})
            if isinstance(step.get("tres"), Mapping)
            else {}
        )
        peak = _tres(req.get("max") if isinstance(req, Mapping) else None, "mem")
        tasks = (
            _num(step.get("tasks", {}).get("count"))
            if isinstance(step.get("tasks"), Mapping)
            else None
        )
        if peak:
            mem_used = max(mem_used, peak * max(tasks or 1.0, 1.0))
    return _Job(
        job_id=job_id,
        submit=float(submit or start),
        start=float(start),
        end=float(end),
        cores=int(cores),
        nodes=int(nodes),
        mem_alloc=float(mem_mb) * MIB if mem_mb else float("nan"),
        cpu_seconds=cpu_seconds,
        mem_used=mem_used if mem_used > 0 else float("nan"),
    )


def read_sacct_json(path: str | Path) -> JobTrace:
    """Jobs of ``sacct --json`` output (Slurm 21.08+). Jobs that never started are skipped."""
    p = str(path)
    text = read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(
            f"not JSON ({exc.msg}); expected sacct --json output",
            path=p,
            line=exc.lineno,
            expected_format="sacct-json",
        ) from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("jobs"), list):
        raise TraceFormatError(
            "no top-level 'jobs' list; expected sacct --json output",
            path=p,
            expected_format="sacct-json",
        )
    jobs: list[_Job] = []
    skipped = 0
    for i, raw in enumerate(doc["jobs"]):
        if not isinstance(raw, Mapping):
            raise TraceFormatError(
                "not an object", path=p, field=f"jobs[{i}]", expected_format="sacct-json"
            )
        job = _json_job(raw, p, i)
        if job is None:
            skipped += 1
        else:
            jobs.append(job)
    return _trace(p, "sacct-json", jobs, skipped)


def _parse_time(value: str) -> float | None:
    if value in _MISSING:
        return None
    return dt.datetime.fromisoformat(value).timestamp()  # local time, as sacct prints it


def _parse_duration(value: str) -> float:
    m = _DURATION.match(value)
    if not m:
        raise ValueError(value)
    days, hours, minutes, seconds = m.groups()
    if hours is None:  # MM:SS(.fff)
        return int(days or 0) * 86400 + int(minutes) * 60 + float(seconds)
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _parse_size(value: str, unit: str = "") -> tuple[float, str]:
    """Bytes and the per-cpu/per-node suffix of ``4000M``, ``4000Mc``, ``123456K``."""
    m = _SIZE.match(value)
    if not m:
        raise ValueError(value)
    number, prefix, per = m.groups()
    return float(number) * _SIZE_FACTOR[prefix or unit], per


def read_sacct_pipe(path: str | Path) -> JobTrace:
    """Jobs of ``sacct -P`` (``--parsable2``) output with its header line."""
    p = str(path)
    lines = read_text(path).splitlines()
    if not lines or "|" not in lines[0]:
        raise TraceFormatError(
            "first line is not a '|'-separated sacct header; expected sacct -P output",
            path=p,
            line=1,
            expected_format="sacct-pipe",
        )
    names = [n.strip() for n in lines[0].split("|")]
    col = {n: i for i, n in enumerate(names)}
    id_col = col.get("JobIDRaw", col.get("JobID"))
    cores_col = col.get("AllocCPUS", col.get("NCPUS"))
    if (
        id_col is None
        or cores_col is None
        or not (
            {"Start", "End"} <= col.keys()
            or ("Start" in col and bool({"ElapsedRaw", "Elapsed"} & col.keys()))
        )
    ):
        raise TraceFormatError(
            "header lacks JobID/JobIDRaw, AllocCPUS/NCPUS, Start and End (or Elapsed)",
            path=p,
            line=1,
            expected_format="sacct-pipe",
        )
    jobs: dict[str, _Job] = {}
    step_mem: dict[str, float] = {}
    skipped = 0
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != len(names):
            raise TraceFormatError(
                f"{len(parts)} fields, the header has {len(names)}",
                path=p,
                line=number,
                expected_format="sacct-pipe",
            )
        row = dict(zip(names, parts, strict=True))
        field = ""
        try:
            field = names[id_col]
            raw_id = parts[id_col]
            base, _, step = raw_id.partition(".")
            if step:
                if "MaxRSS" in row and row["MaxRSS"] not in _MISSING:
                    field = "MaxRSS"
                    rss, _ = _parse_size(row["MaxRSS"])
                    tasks = (
                        float(row.get("NTasks") or 1) if row.get("NTasks") not in _MISSING else 1.0
                    )
                    step_mem[base] = max(step_mem.get(base, 0.0), rss * max(tasks, 1.0))
                continue
            field = "Start"
            start = _parse_time(row["Start"])
            field = "End"
            end = _parse_time(row["End"]) if "End" in row else None
            if end is None and start is not None and ("ElapsedRaw" in row or "Elapsed" in row):
                field = "ElapsedRaw" if "ElapsedRaw" in row else "Elapsed"
                value = row[field]
                end = start + (float(value) if field == "ElapsedRaw" else _parse_duration(value))
            field = "Submit"
            submit = _parse_time(row.get("Submit", "")) or start
            field = names[cores_col]
            cores = int(parts[cores_col] or 0)
            field = "NNodes"
            nodes = int(row["NNodes"]) if row.get("NNodes", "") not in _MISSING else -1
            field = "TotalCPU"
            cpu_seconds = (
                _parse_duration(row["TotalCPU"])
                if row.get("TotalCPU", "") not in _MISSING
                else float("nan")
            )
            field = "ReqMem"
            mem_alloc = float("nan")
            if row.get("ReqMem", "") not in _MISSING:
                mem, per = _parse_size(row["ReqMem"], "M")
                mem_alloc = mem * (cores if per == "c" else max(nodes, 1) if per == "n" else 1)
            field = "MaxRSS"
            mem_used = float("nan")
            if row.get("MaxRSS", "") not in _MISSING:
                mem_used = _parse_size(row["MaxRSS"])[0]
        except (ValueError, KeyError) as exc:
            raise TraceFormatError(
                f"cannot read {str(exc) or 'value'!r}",
                path=p,
                line=number,
                field=field,
                expected_format="sacct-pipe",
            ) from None
        if start is None or end is None or end <= start or cores <= 0 or submit is None:
            skipped += 1
            continue
        try:
            job_id = int(base.split("_")[0].split("+")[0])
        except ValueError:
            job_id = len(jobs) + 1
        jobs[base] = _Job(
            job_id, submit, start, end, cores, nodes, mem_alloc, cpu_seconds, mem_used
        )
    for base, mem in step_mem.items():
        job = jobs.get(base)
        if job is not None and not (job.mem_used >= mem):
            job.mem_used = mem
    return _trace(p, "sacct-pipe", list(jobs.values()), skipped)


def _trace(path: str, fmt: str, jobs: list[_Job], skipped: int) -> JobTrace:
    def arr(attr: str) -> np.ndarray[Any, np.dtype[np.float64]]:
        return np.array([getattr(j, attr) for j in jobs], dtype=np.float64)

    start, end, cores = arr("start"), arr("end"), arr("cores")
    with np.errstate(divide="ignore", invalid="ignore"):
        cpu_ratio = np.clip(arr("cpu_seconds") / ((end - start) * cores), 0.0, 1.0)
    cpu_ratio = np.where(np.isfinite(cpu_ratio) & (arr("cpu_seconds") > 0), cpu_ratio, np.nan)
    log.info("read %d %s jobs from %s (skipped %d)", len(jobs), fmt, path, skipped)
    return JobTrace(
        path=path,
        format=fmt,
        job_id=np.array([j.job_id for j in jobs], dtype=np.int64),
        submit_s=arr("submit"),
        start_s=start,
        end_s=end,
        cores=cores.astype(np.int64),
        nodes=np.array([j.nodes for j in jobs], dtype=np.int64),
        memory_alloc_bytes=arr("mem_alloc"),
        cpu_used_ratio=cpu_ratio,
        memory_used_bytes=arr("mem_used"),
        skipped={"never started or no cores": skipped} if skipped else {},
        notes=("memory_used_bytes: peak (MaxRSS x tasks of the largest step)",),
    )
