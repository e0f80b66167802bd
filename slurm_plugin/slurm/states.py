"""Slurm job and node states, translated by plain lookup tables.

Slurm spells a state as a long name (``RUNNING``), a short code (``R``, in ``squeue``'s
``%t``), or, in newer JSON, a list of a base state plus flags (``["RUNNING", "COMPLETING"]``).
Unknown spellings map to ``UNKNOWN`` instead of raising: a newer Slurm adding a state must
not stop the monitor.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REQUEUED = "REQUEUED"
    RESIZING = "RESIZING"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"

    @property
    def holds_resources(self) -> bool:
        """True while Slurm keeps the job's cores and memory allocated on its nodes."""
        return self in _HOLDING

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_HOLDING = frozenset(
    {
        JobState.CONFIGURING,
        JobState.RUNNING,
        JobState.SUSPENDED,
        JobState.COMPLETING,
        JobState.RESIZING,
        JobState.STOPPED,
    }
)
_FINISHED = frozenset(
    {
        JobState.COMPLETED,
        JobState.CANCELLED,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
        JobState.OUT_OF_MEMORY,
    }
)

# Long names and squeue's short codes (squeue(1), JOB STATE CODES).
JOB_STATES: dict[str, JobState] = {
    **{s.value: s for s in JobState},
    "PD": JobState.PENDING,
    "CF": JobState.CONFIGURING,
    "R": JobState.RUNNING,
    "S": JobState.SUSPENDED,
    "CG": JobState.COMPLETING,
    "CD": JobState.COMPLETED,
    "CA": JobState.CANCELLED,
    "F": JobState.FAILED,
    "TO": JobState.TIMEOUT,
    "NF": JobState.NODE_FAIL,
    "PR": JobState.PREEMPTED,
    "BF": JobState.BOOT_FAIL,
    "DL": JobState.DEADLINE,
    "OOM": JobState.OUT_OF_MEMORY,
    "RQ": JobState.REQUEUED,
    "RS": JobState.RESIZING,
    "ST": JobState.STOPPED,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SPECIAL_EXIT": JobState.FAILED,
    "REVOKED": JobState.CANCELLED,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.COMPLETING,
}

# Flags that override the base state in list-valued JSON (Slurm >= 23.02).
_FLAG_PRIORITY = (JobState.COMPLETING, JobState.CONFIGURING, JobState.RESIZING)


def job_state(raw: str | Iterable[str] | None) -> JobState:
    """The JobState for any spelling Slurm uses; ``UNKNOWN`` for what it does not know."""
    if raw is None:
        return JobState.UNKNOWN
    if isinstance(raw, str):
        return JOB_STATES.get(
            raw.strip().upper().split()[0] if raw.strip() else "", JobState.UNKNOWN
        )
    states = [job_state(str(part)) for part in raw]
    for flag in _FLAG_PRIORITY:
        if flag in states:
            return flag
    known = [s for s in states if s is not JobState.UNKNOWN]
    return known[0] if known else JobState.UNKNOWN


class NodeState(enum.StrEnum):
    IDLE = "IDLE"
    MIXED = "MIXED"
    ALLOCATED = "ALLOCATED"
    COMPLETING = "COMPLETING"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"
    DOWN = "DOWN"
    FUTURE = "FUTURE"
    RESERVED = "RESERVED"
    UNKNOWN = "UNKNOWN"

    @property
    def runs_jobs(self) -> bool:
        """True when jobs may be running on the node (so its usage is worth sampling)."""
        return self in {
            NodeState.MIXED,
            NodeState.ALLOCATED,
            NodeState.COMPLETING,
            NodeState.DRAINING,
        }


NODE_STATES: dict[str, NodeState] = {
    **{s.value: s for s in NodeState},
    "ALLOC": NodeState.ALLOCATED,
    "MIX": NodeState.MIXED,
    "COMP": NodeState.COMPLETING,
    "DRAIN": NodeState.DRAINED,
    "DRNG": NodeState.DRAINING,
    "DRAIN+ALLOC": NodeState.DRAINING,
    "DRAIN+MIX": NodeState.DRAINING,
    "RESV": NodeState.RESERVED,
    "UNK": NodeState.UNKNOWN,
    "NOT_RESPONDING": NodeState.DOWN,
    "PLANNED": NodeState.IDLE,
}


def node_state(raw: str | Iterable[str] | None) -> NodeState:
    """The NodeState for sinfo's spellings (``idle``, ``mixed*``, ``["IDLE", "DRAIN"]``)."""
    if raw is None:
        return NodeState.UNKNOWN
    parts = [raw] if isinstance(raw, str) else [str(p) for p in raw]
    names = [p.strip().upper().rstrip("*~#!%$@^-+") for p in parts]
    names = [n for part in names for n in part.split("+") if n]
    states = [NODE_STATES.get(n, NodeState.UNKNOWN) for n in names]
    if NodeState.DOWN in states:
        return NodeState.DOWN
    if NodeState.DRAINED in states:
        busy = {NodeState.ALLOCATED, NodeState.MIXED, NodeState.COMPLETING}
        return NodeState.DRAINING if busy & set(states) else NodeState.DRAINED
    known = [s for s in states if s is not NodeState.UNKNOWN]
    return known[0] if known else NodeState.UNKNOWN
