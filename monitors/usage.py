"""What a usage source reads for each job on a node, and the protocol every source follows.

Sources: ``CgroupV1Source`` and ``CgroupV2Source`` (Slurm's per-job cgroups, roots
injectable), ``ProcessScanSource`` (psutil, when Slurm runs without cgroup tracking), and
``FallbackSource`` (a cgroup source, with the process scan for jobs it cannot find).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from slurm_plugin.slurm import JobOnNode


@dataclass(frozen=True, slots=True)
class JobUsage:
    """One job's usage on this node at one instant.

    ``cpu_seconds_total`` is cumulative CPU time (user + system) of the job on this node;
    rates come from two readings. Memory is the working set in bytes (usage minus inactive
    page cache, as kubelet counts it); ``memory_peak_bytes`` is the kernel's high-water mark
    where the source has one, else None. ``cpu_seconds_per_cpu`` is the same time split by
    CPU (per-core busy time: which of the job's cores it really uses). ``cpu_ids`` are the
    kernel CPU numbers of the job's cpuset (None when the source cannot tell). Pressure is PSI ``some avg10`` in percent.
    """

    job_id: str
    cpu_seconds_total: float
    memory_bytes: int
    memory_peak_bytes: int | None = None
    processes: int = 0
    cpu_ids: tuple[int, ...] | None = None
    cpu_pressure: float | None = None
    memory_pressure: float | None = None
    source: str = ""
    memory_limit_bytes: int | None = None  # the cgroup's memory limit (the allocation), if any
    uid: int | None = None  # the job owner's uid, where the layout shows it (v1: uid_<uid>)
    # Cumulative CPU time per CPU, indexed by the kernel's CPU number (v1: cpuacct.usage_percpu);
    # None where the source has no per-CPU accounting (cgroup v2, the process scan).
    cpu_seconds_per_cpu: tuple[float, ...] | None = None
    read_at: float | None = None  # time.monotonic() right after the CPU counters were read
    # Thread id -> cumulative (ns on a CPU, ns waiting on a run queue); None where the source
    # does not read it. Used + waiting is what the job wants, even on a busy CPU.
    run_delay_ns: dict[int, tuple[int, int]] | None = None


@dataclass(frozen=True, slots=True)
class UsageReading:
    """Everything one source read in one pass: usage per job id, and what it had to skip."""

    jobs: Mapping[str, JobUsage] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class UsageSource(Protocol):
    """Reads the usage of the jobs on ``node``. Never raises for bad input: anything it
    cannot read becomes a warning naming it, and the rest is still returned.

    ``expected`` are the jobs Slurm says hold resources on the node (used to resolve
    cgroup directory names such as SLUIDs, and by fallbacks to know what is missing); a
    source may also report jobs Slurm did not mention (e.g. a job that just ended).
    """

    name: str

    def read(self, node: str, expected: Sequence[JobOnNode] = ()) -> UsageReading: ...
