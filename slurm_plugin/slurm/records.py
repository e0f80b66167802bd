"""What the Slurm seam answers with: plain frozen records, the same for every backend.

Units: bytes for memory, epoch seconds for times. ``cpu_ids`` are the CPU numbers Slurm
reports for the node (``scontrol -d show job``'s ``CPU_IDs``); on nodes configured with
``CPUs=$(nproc)`` and no SMT reordering they equal the kernel's numbers. The monitor
prefers the job cgroup's cpuset (always the kernel's numbers) where it exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from slurm_plugin.slurm.states import JobState, NodeState

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Parsed(Generic[T]):
    """Items read from Slurm plus a warning for each one that had to be skipped or guessed."""

    items: tuple[T, ...] = ()
    warnings: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class JobOnNode:
    """A job's share of one node."""

    job_id: str
    user: str
    uid: int | None
    node: str
    state: JobState
    cores: int
    cpu_ids: tuple[int, ...]
    memory_bytes: int
    start_time: float | None = None
    nodes: tuple[str, ...] = ()
    partition: str | None = None
    time_limit_s: float | None = None
    sluid: str | None = None  # Slurm >= 26.05 names cgroup v2 job directories by it


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node as Slurm sees it. ``free_memory_bytes`` is the kernel's free memory (None if unknown)."""

    name: str
    state: NodeState
    cpus: int
    real_memory_bytes: int
    alloc_cpus: int = 0
    alloc_memory_bytes: int = 0
    free_memory_bytes: int | None = None
    cpu_load: float | None = None  # load average, 1.0 = one busy CPU
    partitions: tuple[str, ...] = ()
    state_raw: str = ""


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    """A process Slurm tracks for a job (``scontrol listpids``)."""

    pid: int
    job_id: str
    step: str
