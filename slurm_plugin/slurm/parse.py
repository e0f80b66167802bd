"""Parsing of Slurm's outputs, defensively: unknown fields are ignored, a missing or
malformed field skips that one record with a warning, never the whole answer.

Field names and shapes differ between releases. Slurm 22.05 (``openapi/v0.0.38``) writes
plain numbers and a string ``job_state``; 23.02+ (``v0.0.39``+) wraps numbers as
``{"set": true, "infinite": false, "number": N}`` and writes states as lists of flags.
Both are accepted. Real outputs live in ``tests/fixtures/slurm/<release>/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from colocate.units import MIB
from slurm_plugin.slurm.hostlist import expand_hostlist, parse_cpu_ids
from slurm_plugin.slurm.records import JobOnNode, NodeInfo, Parsed, ProcessEntry
from slurm_plugin.slurm.states import JobState, job_state, node_state


class SlurmParseError(ValueError):
    """A whole answer could not be read (not JSON, no ``jobs``/``nodes`` list)."""


def number(value: Any) -> float | None:
    """A number from 22.05's plain values or 23.02+'s ``{set, infinite, number}`` objects.

    None for unset or infinite values and for anything that is not a number.
    """
    if isinstance(value, Mapping):
        if not value.get("set", True) or value.get("infinite", False):
            return None
        value = value.get("number")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _load(text: str, what: str, key: str) -> tuple[list[Any], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SlurmParseError(f"{what} did not print JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get(key), list):
        raise SlurmParseError(f"{what} JSON has no {key!r} list")
    errors = [
        str(e.get("error") or e.get("description") or e) if isinstance(e, Mapping) else str(e)
        for e in data.get("errors") or []
    ]
    return list(data[key]), [f"{what} reported: {e}" for e in errors]


def _allocated_cores(node_entry: Mapping[str, Any]) -> int | None:
    """Cores marked allocated in 22.05's ``job_resources.allocated_nodes[].sockets`` map."""
    sockets = node_entry.get("sockets")
    if not isinstance(sockets, Mapping):
        return None
    count = 0
    for sock in sockets.values():
        cores = sock.get("cores") if isinstance(sock, Mapping) else None
        if isinstance(cores, Mapping):
            count += sum(1 for v in cores.values() if "alloc" in str(v).lower())
    return count


@dataclass(frozen=True, slots=True)
class SqueueJob:
    """A job from ``squeue --json``, with its per-node memory (bytes) and core counts."""

    job_id: str
    user: str
    uid: int | None
    state: JobState
    nodes: tuple[str, ...]
    start_time: float | None
    partition: str | None
    time_limit_s: float | None
    memory_per_node: dict[str, int]
    cores_per_node: dict[str, int]
    sluid: str | None = None


def _squeue_job(raw: Mapping[str, Any]) -> SqueueJob:
    job_id = number(raw.get("job_id"))
    if job_id is None:
        raise ValueError("no job_id")
    jid = str(int(job_id))
    state = job_state(raw.get("job_state"))
    nodes = expand_hostlist(str(raw.get("nodes") or ""))
    start = number(raw.get("start_time"))
    limit = number(raw.get("time_limit"))
    uid = number(raw.get("user_id"))
    mem: dict[str, int] = {}
    cores: dict[str, int] = {}
    resources = raw.get("job_resources")
    if isinstance(resources, Mapping):
        alloc = resources.get("allocated_nodes")  # 22.05 .. 23.11
        if not alloc and isinstance(resources.get("nodes"), Mapping):
            alloc = resources["nodes"].get("allocation")  # 24.05+
        for entry in alloc if isinstance(alloc, list) else []:
            if not isinstance(entry, Mapping):
                continue
            name = str(entry.get("nodename") or entry.get("name") or "")
            m = number(entry.get("memory_allocated"))
            if m is None and isinstance(entry.get("memory"), Mapping):
                m = number(entry["memory"].get("allocated"))
            if name and m is not None:
                mem[name] = int(m) * MIB
            c = _allocated_cores(entry)
            cpus = entry.get("cpus")
            if c is None and isinstance(cpus, Mapping):  # 24.05+: {"count": N, "used": M}
                count = number(cpus.get("count"))
                c = int(count) if count is not None else None
            if name and c is not None:
                cores[name] = c
    per_node = number(raw.get("memory_per_node"))
    per_cpu = number(raw.get("memory_per_cpu"))
    for n in nodes:
        if n not in mem:
            if per_node is not None:
                mem[n] = int(per_node) * MIB
            elif per_cpu is not None and n in cores:
                mem[n] = int(per_cpu) * cores[n] * MIB
    return SqueueJob(
        job_id=jid,
        user=str(raw.get("user_name") or (int(uid) if uid is not None else "?")),
        uid=int(uid) if uid is not None else None,
        state=state,
        nodes=nodes,
        start_time=start if start else None,
        partition=str(raw["partition"]) if raw.get("partition") else None,
        time_limit_s=limit * 60.0 if limit is not None else None,
        memory_per_node=mem,
        cores_per_node=cores,
        sluid=str(raw["sluid"]) if raw.get("sluid") else None,
    )


def parse_squeue_json(text: str) -> Parsed[SqueueJob]:
    """All jobs in ``squeue --json`` output; a job that cannot be read becomes a warning."""
    raw_jobs, warnings = _load(text, "squeue --json", "jobs")
    jobs: list[SqueueJob] = []
    for i, raw in enumerate(raw_jobs):
        try:
            if not isinstance(raw, Mapping):
                raise ValueError("not an object")
            jobs.append(_squeue_job(raw))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            ident = raw.get("job_id", f"#{i}") if isinstance(raw, Mapping) else f"#{i}"
            warnings.append(f"squeue --json: skipped job {ident}: {exc}")
    return Parsed(tuple(jobs), tuple(warnings))


def _node_info(raw: Mapping[str, Any]) -> NodeInfo:
    name = raw.get("name") or raw.get("hostname")
    cpus = number(raw.get("cpus"))
    mem = number(raw.get("real_memory"))
    if not name or cpus is None or mem is None:
        raise ValueError("missing name, cpus or real_memory")
    state_raw = raw.get("state")
    flags = raw.get("state_flags")
    parts = ([state_raw] if isinstance(state_raw, str) else list(state_raw or [])) + list(
        flags if isinstance(flags, list) else []
    )
    free = number(raw.get("free_memory", raw.get("free_mem")))
    load = number(raw.get("cpu_load"))
    parts_list = raw.get("partitions")
    return NodeInfo(
        name=str(name),
        state=node_state([str(p) for p in parts]),
        cpus=int(cpus),
        real_memory_bytes=int(mem) * MIB,
        alloc_cpus=int(number(raw.get("alloc_cpus")) or 0),
        alloc_memory_bytes=int(number(raw.get("alloc_memory")) or 0) * MIB,
        free_memory_bytes=int(free) * MIB if free is not None else None,
        cpu_load=load / 100.0 if load is not None else None,
        partitions=tuple(str(p) for p in parts_list) if isinstance(parts_list, list) else (),
        state_raw="+".join(str(p) for p in parts),
    )


def parse_sinfo_json(text: str) -> Parsed[NodeInfo]:
    """All nodes in ``sinfo --json`` output; a node that cannot be read becomes a warning."""
    raw_nodes, warnings = _load(text, "sinfo --json", "nodes")
    nodes: list[NodeInfo] = []
    for i, raw in enumerate(raw_nodes):
        try:
            if not isinstance(raw, Mapping):
                raise ValueError("not an object")
            nodes.append(_node_info(raw))
        except (ValueError, TypeError, KeyError) as exc:
            ident = raw.get("name", f"#{i}") if isinstance(raw, Mapping) else f"#{i}"
            warnings.append(f"sinfo --json: skipped node {ident}: {exc}")
    return Parsed(tuple(nodes), tuple(warnings))


_JOB_ID = re.compile(r"(?:^|\s)JobId=(\d+)")
_DETAIL = re.compile(r"(?:^|\s)Nodes=(\S+)\s+CPU_IDs=(\S*)\s+Mem=(\d+)")


@dataclass(frozen=True, slots=True)
class NodeLayout:
    """One job's CPU ids and memory (bytes) on one node, from ``scontrol -o -d show job``."""

    job_id: str
    node: str
    cpu_ids: tuple[int, ...]
    memory_bytes: int


def parse_scontrol_job_detail(text: str) -> Parsed[NodeLayout]:
    """Per-node ``CPU_IDs=`` and ``Mem=`` (MB) of every job in ``scontrol -o -d show job``.

    Lines without a JobId or with malformed lists become warnings. Pending jobs have no
    detail and yield nothing.
    """
    layouts: list[NodeLayout] = []
    warnings: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _JOB_ID.search(line)
        if not m:
            warnings.append(f"scontrol show job: line {lineno} has no JobId; skipped")
            continue
        for nodes, cpus, mem in _DETAIL.findall(line):
            try:
                ids = parse_cpu_ids(cpus)
                layouts.extend(
                    NodeLayout(m[1], n, ids, int(mem) * MIB) for n in expand_hostlist(nodes)
                )
            except ValueError as exc:
                warnings.append(f"scontrol show job {m[1]}: skipped {nodes}: {exc}")
    return Parsed(tuple(layouts), tuple(warnings))


def parse_listpids(text: str) -> Parsed[ProcessEntry]:
    """``scontrol listpids`` rows (``PID JOBID STEPID LOCALID GLOBALID``)."""
    entries: list[ProcessEntry] = []
    warnings: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        cols = line.split()
        if not cols or cols[0] == "PID":
            continue
        if len(cols) < 3 or not cols[0].isdigit():
            warnings.append(f"scontrol listpids: line {lineno} unreadable: {line.strip()!r}")
            continue
        entries.append(ProcessEntry(int(cols[0]), cols[1], cols[2]))
    return Parsed(tuple(entries), tuple(warnings))


def jobs_for_node(
    node: str, squeue: Parsed[SqueueJob], layouts: Mapping[tuple[str, str], NodeLayout]
) -> Parsed[JobOnNode]:
    """Join squeue's jobs that hold resources on ``node`` with their per-node layout."""
    out: list[JobOnNode] = []
    warnings: list[str] = []
    for job in squeue.items:
        if node not in job.nodes or not job.state.holds_resources:
            continue
        layout = layouts.get((job.job_id, node))
        if layout is not None:
            cpu_ids = layout.cpu_ids
            memory = layout.memory_bytes
            cores = len(cpu_ids)
        else:
            warnings.append(
                f"job {job.job_id}: no CPU ids for {node} from scontrol; cores counted from squeue"
            )
            cpu_ids = ()
            memory = job.memory_per_node.get(node, 0)
            cores = job.cores_per_node.get(node, 0)
        out.append(
            JobOnNode(
                job_id=job.job_id,
                user=job.user,
                uid=job.uid,
                node=node,
                state=job.state,
                cores=cores,
                cpu_ids=cpu_ids,
                memory_bytes=memory,
                start_time=job.start_time,
                nodes=job.nodes,
                partition=job.partition,
                time_limit_s=job.time_limit_s,
                sluid=job.sluid,
            )
        )
    return Parsed(tuple(out), tuple(warnings))
