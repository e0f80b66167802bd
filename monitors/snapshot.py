"""The node snapshot: what a node's jobs were given and what they use, at one instant.

Its JSON form (``to_json``) is a contract (``colocate monitor --json``, metrics, agent).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    """One running job on this node. Units: cores, bytes; pressure in percent (PSI some avg10).

    ``cores_used`` is a rate over the sampler's window: the first sample of a job has no
    window yet and reports 0.0 (psutil's ``cpu_percent()`` has the same quirk).
    """

    job_id: str
    user: str
    cores_allocated: int
    cpu_ids: tuple[int, ...]
    cores_used: float
    memory_allocated_bytes: int
    memory_used_bytes: int
    memory_peak_bytes: int
    processes: int = 0
    cpu_pressure: float | None = None
    memory_pressure: float | None = None
    uid: int | None = None
    colocate: bool = True
    start_time: float | None = None
    cpu_seconds_total: float | None = None  # cumulative CPU time of the job on this node
    state: str = "RUNNING"  # Slurm's job state (RUNNING, SUSPENDED, COMPLETING, ...)
    nodes: tuple[str, ...] = ()  # every node of the job (multi-node jobs)
    # (CPU id, busy share 0..1 over the window) for each of the job's CPUs; () where the
    # source has no per-CPU accounting (cgroup v2, process scan) or no window yet.
    cpu_busy: tuple[tuple[int, float], ...] = ()
    # cores' worth of time its threads spent runnable but waiting for a CPU over the last
    # interval (schedstat run_delay); used + waiting is what the job wants. None: not read.
    cores_waiting: float | None = None

    @property
    def cores_idle(self) -> float:
        return max(0.0, self.cores_allocated - self.cores_used)

    @property
    def memory_unused_bytes(self) -> int:
        return max(0, self.memory_allocated_bytes - self.memory_used_bytes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_ids"] = list(self.cpu_ids)
        data["nodes"] = list(self.nodes)
        data["cpu_busy"] = {str(cpu): busy for cpu, busy in self.cpu_busy}
        data["cores_idle"] = self.cores_idle
        data["memory_unused_bytes"] = self.memory_unused_bytes
        return data


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One node at time ``t`` (epoch seconds). ``slurm_ok`` is False while Slurm is unavailable."""

    node: str
    t: float
    cores_total: int
    cpu_ids: tuple[int, ...]
    memory_total_bytes: int
    cores_unallocated: int
    memory_unallocated_bytes: int
    jobs: tuple[JobSnapshot, ...] = ()
    slurm_ok: bool = True
    warnings: tuple[str, ...] = field(default=())
    cpu_pressure: float | None = None  # node-wide PSI some avg10 (%), /proc/pressure
    memory_pressure: float | None = None
    source: str = ""  # where usage came from: cgroup-v1, cgroup-v2, psutil

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "t": self.t,
            "cores_total": self.cores_total,
            "cpu_ids": list(self.cpu_ids),
            "memory_total_bytes": self.memory_total_bytes,
            "cores_unallocated": self.cores_unallocated,
            "memory_unallocated_bytes": self.memory_unallocated_bytes,
            "slurm_ok": self.slurm_ok,
            "warnings": list(self.warnings),
            "cpu_pressure": self.cpu_pressure,
            "memory_pressure": self.memory_pressure,
            "source": self.source,
            "jobs": [job.to_json() for job in self.jobs],
        }
