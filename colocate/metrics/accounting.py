"""Wasted and recovered money, integrated over time between samples (pure: no I/O, no clock).

Definitions (the same words as the dashboard):

- **idle inside allocations**: cores and memory Slurm gave a job that the job does not use.
  Core-seconds idle over an interval = allocated cores x seconds - CPU-seconds the job used
  (the jobstats/seff numerator, so a job's idle core-seconds and its CPU efficiency agree);
  memory byte-seconds idle = (allocated - used) bytes x seconds.
- **unallocated**: cores and memory of the node no job holds.
- **wasted cost**: what idle and unallocated resources cost at ``Prices``, whether or not
  functions ran on them (it is the opportunity); **recovered cost**: what the resources
  leased to functions are worth at the same prices (leases are billed like batch jobs: by
  what is held). Net waste = wasted - recovered.

Integration rule, for consecutive samples at ``t0 < t1``: allocations, leases and
unallocated resources seen at ``t0`` are held until ``t1`` (they change in steps); a job's
CPU is the difference of its cumulative CPU-seconds where the monitor reports it, else its
rate at ``t1`` times the interval; its memory is the mean of the two samples. A job seen
for the first time accrues from that sample on. Gaps longer than ``max_gap_s`` (agent
paused, node down) accrue nothing and are counted in ``skipped_s``.

Resources are labelled ``cores`` and ``memory`` when ``Prices.charging == "resources"``;
with ``charging == "node"`` there is one resource, ``node``, costed by ``Prices.idle_cost``
(the larger of the core and memory share of a node-hour).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitors.snapshot import JobSnapshot, NodeSnapshot
from policies.prices import Prices

IDLE_ALLOCATED = "idle_allocated"
UNALLOCATED = "unallocated"
WASTE_STATES: tuple[str, ...] = (IDLE_ALLOCATED, UNALLOCATED)


def resources_of(prices: Prices) -> tuple[str, ...]:
    """The ``resource`` label values money is split by under ``prices.charging``."""
    return ("node",) if prices.charging == "node" else ("cores", "memory")


def cost_by_resource(
    prices: Prices,
    core_seconds: float,
    memory_byte_seconds: float,
    node_cores: int,
    node_memory_bytes: int,
) -> dict[str, float]:
    """Cost of cores and memory held for some time, split by ``resources_of(prices)``."""
    if prices.charging == "node":
        return {
            "node": prices.idle_cost(
                core_seconds, memory_byte_seconds, node_cores, node_memory_bytes
            )
        }
    return {
        "cores": prices.resource_cost(core_seconds, 0.0),
        "memory": prices.resource_cost(0.0, memory_byte_seconds),
    }


def cpu_efficiency(cpu_seconds: float, elapsed_s: float, cores_allocated: int) -> float | None:
    """jobstats/seff CPU efficiency: CPU-seconds / (elapsed seconds x allocated cores), 0..1+.

    None when it is undefined (no elapsed time or no cores). Not clamped: a job without a
    cpuset can use more than it was given, and the dashboard should show it.
    """
    if elapsed_s <= 0 or cores_allocated <= 0:
        return None
    return cpu_seconds / (elapsed_s * cores_allocated)


def memory_efficiency(peak_bytes: int, allocated_bytes: int) -> float | None:
    """seff memory efficiency: peak memory / allocated memory; None without an allocation."""
    if allocated_bytes <= 0:
        return None
    return peak_bytes / allocated_bytes


@dataclass(slots=True)
class JobAccount:
    """What one job has wasted since the accounting first saw it (seconds, core-seconds, bytes)."""

    job_id: str
    first_seen: float
    observed_s: float = 0.0
    cpu_seconds: float = 0.0
    idle_core_seconds: float = 0.0
    idle_memory_byte_seconds: float = 0.0
    wasted_cost: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Held:
    """The previous sample, held over the next interval."""

    snapshot: NodeSnapshot
    leased_cores: float
    leased_memory_bytes: int


class CostAccount:
    """Integrates one node's waste and recovery; call :meth:`advance` once per sample.

    Not thread-safe: one owner (the metrics collector, under its lock) drives it.
    """

    def __init__(self, prices: Prices, max_gap_s: float = 60.0) -> None:
        if max_gap_s <= 0:
            raise ValueError("max_gap_s must be positive")
        self.prices = prices
        self.max_gap_s = max_gap_s
        self.jobs: dict[str, JobAccount] = {}
        self.skipped_s = 0.0
        self.accounted_s = 0.0
        self.wasted_core_seconds = dict.fromkeys(WASTE_STATES, 0.0)
        self.wasted_memory_byte_seconds = dict.fromkeys(WASTE_STATES, 0.0)
        self.recovered_core_seconds = 0.0
        self.recovered_memory_byte_seconds = 0.0
        self.wasted_cost = {(r, s): 0.0 for r in resources_of(prices) for s in WASTE_STATES}
        self.recovered_cost = dict.fromkeys(resources_of(prices), 0.0)
        self._held: _Held | None = None

    def advance(
        self, snapshot: NodeSnapshot, leased_cores: float, leased_memory_bytes: int, now: float
    ) -> None:
        """Accrue the interval from the previous sample to ``now`` (normally ``snapshot.t``).

        A sample not later than the previous one is ignored (clock step, duplicate), and so
        is the previous sample handed in again (an agent deciding without sampling, as in a
        prolog): accruing it up to ``now`` and again from its own time at the next sample
        would count that stretch twice.
        """
        held = self._held
        if held is not None and (now <= held.snapshot.t or snapshot.t <= held.snapshot.t):
            return
        if held is not None:
            dt = now - held.snapshot.t
            if dt > self.max_gap_s:
                self.skipped_s += dt
            else:
                self._accrue(held, snapshot, dt)
        current = {job.job_id: job for job in snapshot.jobs}
        for job_id in list(self.jobs):
            if job_id not in current:
                del self.jobs[job_id]  # the job ended: its series vanish
        for job_id in current:
            if job_id not in self.jobs:
                self.jobs[job_id] = JobAccount(job_id, first_seen=now)
        self._held = _Held(snapshot, float(leased_cores), int(leased_memory_bytes))

    def _accrue(self, held: _Held, current: NodeSnapshot, dt: float) -> None:
        prev = held.snapshot
        now_jobs = {job.job_id: job for job in current.jobs}
        node_cores, node_memory = prev.cores_total, prev.memory_total_bytes
        idle_core_s = idle_mem_bs = 0.0
        for job in prev.jobs:
            core_s, mem_bs, cpu_s = _job_idle(job, now_jobs.get(job.job_id), dt)
            idle_core_s += core_s
            idle_mem_bs += mem_bs
            account = self.jobs.get(job.job_id)
            if account is not None:
                account.observed_s += dt
                account.cpu_seconds += cpu_s
                account.idle_core_seconds += core_s
                account.idle_memory_byte_seconds += mem_bs
                for resource, cost in cost_by_resource(
                    self.prices, core_s, mem_bs, node_cores, node_memory
                ).items():
                    account.wasted_cost[resource] = account.wasted_cost.get(resource, 0.0) + cost
        unalloc_core_s = prev.cores_unallocated * dt
        unalloc_mem_bs = prev.memory_unallocated_bytes * dt
        for state, core_s, mem_bs in (
            (IDLE_ALLOCATED, idle_core_s, idle_mem_bs),
            (UNALLOCATED, unalloc_core_s, unalloc_mem_bs),
        ):
            self.wasted_core_seconds[state] += core_s
            self.wasted_memory_byte_seconds[state] += mem_bs
            for resource, cost in cost_by_resource(
                self.prices, core_s, mem_bs, node_cores, node_memory
            ).items():
                self.wasted_cost[(resource, state)] += cost
        rec_core_s = held.leased_cores * dt
        rec_mem_bs = held.leased_memory_bytes * dt
        self.recovered_core_seconds += rec_core_s
        self.recovered_memory_byte_seconds += rec_mem_bs
        for resource, cost in cost_by_resource(
            self.prices, rec_core_s, rec_mem_bs, node_cores, node_memory
        ).items():
            self.recovered_cost[resource] += cost
        self.accounted_s += dt


def _job_idle(prev: JobSnapshot, cur: JobSnapshot | None, dt: float) -> tuple[float, float, float]:
    """(idle core-seconds, idle memory byte-seconds, CPU-seconds used) of one job over ``dt``."""
    cpu_s: float
    if (
        cur is not None
        and prev.cpu_seconds_total is not None
        and cur.cpu_seconds_total is not None
        and cur.cpu_seconds_total >= prev.cpu_seconds_total
    ):
        cpu_s = cur.cpu_seconds_total - prev.cpu_seconds_total
    else:
        cpu_s = (cur if cur is not None else prev).cores_used * dt
    idle_core_s = max(0.0, prev.cores_allocated * dt - cpu_s)
    used = (
        prev.memory_used_bytes
        if cur is None
        else (prev.memory_used_bytes + cur.memory_used_bytes) / 2
    )
    idle_mem_bs = max(0.0, prev.memory_allocated_bytes - used) * dt
    return idle_core_s, idle_mem_bs, cpu_s
