"""The node sampler: one ``NodeSnapshot`` per call, joining Slurm's allocations with usage.

Per call it reads the usage source (cgroups: a few small files per job) and asks Slurm for
the node's jobs only when something may have changed: every ``slurm_refresh_s``, when the
set of jobs the source sees changes (a job started or ended), or while a job is in a
transient state (completing, configuring). Node totals come from Slurm every
``node_refresh_s``. This keeps the cost of sampling every second to a small fraction of
one core (``benchmarks/monitor.py``).

Slurm is asked from one worker thread and the sampler waits at most ``slurm_wait_s`` for an
answer, so a slow Slurm never stalls sampling. When Slurm does not answer in time or fails
(``SlurmUnavailable``) the sampler keeps producing snapshots with ``slurm_ok=False``, from
the last known allocations of the jobs the source still sees, and retries failures with
exponential backoff (1 s, 2 s, 4 s ... up to 30 s). A job whose cgroup is gone has ended; a
known job never seen in a cgroup stays for ``GONE_AFTER_S`` after it was last seen (a job
still starting has no cgroup yet, and a process scan may miss processes between fork and
exec): its cores are not taken for free because Slurm fell silent at that moment.

``cores_used`` is CPU time over the last ``window_s`` seconds of readings: the first sample
of a job has no window yet and reports 0.0 (psutil's ``cpu_percent()`` has the same quirk);
such samples are not added to the history. Where the source has per-CPU accounting (cgroup
v1's ``cpuacct.usage_percpu``), each sample also says how busy each of the job's CPUs was
over the same window (``cpu_busy``): the policy lends the cores a job leaves idle.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

from colocate.errors import SlurmUnavailable
from monitors.history import UsageHistory
from monitors.psi import node_pressure
from monitors.snapshot import JobSnapshot, NodeSnapshot
from monitors.usage import JobUsage, UsageReading, UsageSource
from policies.model import UsageSample
from slurm_plugin.slurm import JobOnNode, JobState, NodeInfo, NodeState, SlurmClient

log = logging.getLogger(__name__)

T = TypeVar("T")
MIN_WINDOW_S = 0.05  # readings closer than this give no meaningful rate
GONE_AFTER_S = 5.0  # while Slurm is silent, a known job unseen this long has ended
# States that end within seconds: while a job is in one, Slurm is asked every sample.
_TRANSIENT = frozenset({JobState.COMPLETING, JobState.CONFIGURING})


# (when, cumulative CPU s, per-CPU s or None, thread id -> run-queue wait ns or None)
_Reading = tuple[float, float, tuple[float, ...] | None, dict[int, tuple[int, int]] | None]
# A thread's run-queue wait counts up to this many times the CPU time it got: a CPU-bound
# thread on a shared CPU waits about as long as it runs (it wants a whole core), while a
# thread that wakes often to check something waits far longer than it runs under load and
# wants almost nothing.
WAIT_PER_RUN = 3.0
# (cores used, per-CPU busy shares, cores waiting) over a window, or None without one
_Rates = tuple[float, tuple[tuple[int, float], ...], float | None] | None


class _Pending(Exception):
    """Slurm has not answered yet; the question stays in flight."""


class Backoff:
    """Exponential backoff between retries: ``initial_s``, doubling, capped at ``max_s``."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.delay_s = 0.0
        self.next_at = 0.0

    def ready(self, mono: float) -> bool:
        return mono >= self.next_at

    def failed(self, mono: float) -> float:
        """Record a failure at ``mono``; returns the delay before the next attempt."""
        self.delay_s = min(self.max_s, self.delay_s * 2 if self.delay_s else self.initial_s)
        self.next_at = mono + self.delay_s
        return self.delay_s

    def succeeded(self) -> None:
        self.delay_s = 0.0
        self.next_at = 0.0


class Sampler:
    """Samples one node. Not thread-safe: one caller (the agent loop or the CLI).

    ``window_s``: seconds of readings ``cores_used`` is averaged over. ``slurm_refresh_s``:
    ask Slurm for the node's jobs at least this often (seconds), besides on changes.
    ``node_refresh_s``: node totals are re-read this often. ``slurm_wait_s``: the longest a
    sample waits for Slurm. ``monotonic`` is injectable (tests); wall time comes in as
    ``sample(now)``. Call ``close()`` when done (stops the Slurm worker thread).
    """

    def __init__(
        self,
        node: str,
        slurm: SlurmClient,
        source: UsageSource,
        *,
        window_s: float = 3.0,
        slurm_refresh_s: float = 5.0,
        node_refresh_s: float = 60.0,
        history: UsageHistory | None = None,
        proc: str | Path = "/proc",
        monotonic: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        warn_every_s: float = 60.0,
        slurm_wait_s: float = 2.0,
    ) -> None:
        self.node = node
        self.slurm = slurm
        self.source = source
        self.window_s = window_s
        self.slurm_refresh_s = slurm_refresh_s
        self.node_refresh_s = node_refresh_s
        self.history = history if history is not None else UsageHistory()
        self.proc = Path(proc)
        self._mono = monotonic
        self.backoff = backoff or Backoff()
        self.warn_every_s = warn_every_s
        self._jobs: list[JobOnNode] | None = None
        self._jobs_at = -1e18
        self._slurm_error: str | None = None
        self._node: NodeInfo | None = None
        self._node_at = -1e18
        self._last_seen: frozenset[str] | None = None
        self._readings: dict[str, deque[_Reading]] = {}
        self._peaks: dict[str, int] = {}
        # job id -> when the source last saw it, and whether in a cgroup (then its absence
        # means the job ended)
        self._seen_at: dict[str, tuple[float, bool]] = {}
        self._logged: dict[str, float] = {}
        self.slurm_wait_s = slurm_wait_s
        # Slurm is asked from one worker thread so a slow Slurm cannot stall sampling.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="slurm"
        )
        self._inflight: dict[str, concurrent.futures.Future[Any]] = {}

    # -- Slurm -------------------------------------------------------------------------
    def _ask(self, key: str, question: Callable[[], T]) -> T:
        """Ask Slurm in the worker thread; wait at most ``slurm_wait_s`` for the answer.

        Raises ``_Pending`` when Slurm is slower than that (the answer is collected by a
        later call), and whatever the question raised (``SlurmUnavailable``).
        """
        future = self._inflight.get(key)
        if future is None:
            future = self._pool.submit(question)
            self._inflight[key] = future
        try:
            answer: T = future.result(timeout=self.slurm_wait_s)
            return answer
        except concurrent.futures.TimeoutError:
            raise _Pending from None
        finally:
            if future.done():
                self._inflight.pop(key, None)

    def _refresh_jobs(self, mono: float, warnings: list[str]) -> bool:
        """Ask Slurm for the node's jobs unless backing off. True when the list was updated."""
        if not self.backoff.ready(mono) and "jobs" not in self._inflight:
            return False
        try:
            parsed = self._ask("jobs", lambda: self.slurm.jobs_on_node(self.node))
        except _Pending:
            self._slurm_error = (
                f"Slurm slow: no answer within {self.slurm_wait_s:g} s; showing the last known jobs"
            )
            return False
        except SlurmUnavailable as exc:
            delay = self.backoff.failed(mono)
            self._slurm_error = f"Slurm unavailable ({exc}); retrying in {delay:g} s"
            return False
        self.backoff.succeeded()
        self._slurm_error = None
        self._jobs = list(parsed.items)
        self._jobs_at = mono
        warnings.extend(parsed.warnings)
        return True

    def _node_info(self, mono: float, warnings: list[str]) -> NodeInfo:
        stale = self._node is None or mono - self._node_at >= self.node_refresh_s
        if stale and (self._node is None or self.backoff.ready(mono) or "node" in self._inflight):
            try:
                self._node = self._ask("node", lambda: self.slurm.node_info(self.node))
                self._node_at = mono
            except _Pending:
                warnings.append("node totals from Slurm: no answer yet")
            except SlurmUnavailable as exc:
                warnings.append(f"node totals from Slurm unavailable ({exc})")
        if self._node is not None:
            return self._node
        warnings.append("node totals taken from this machine (Slurm has not answered yet)")
        return NodeInfo(
            name=self.node,
            state=NodeState.UNKNOWN,
            cpus=os.cpu_count() or 1,
            real_memory_bytes=psutil.virtual_memory().total,
        )

    def close(self) -> None:
        """Stop the Slurm worker thread (a question in flight is abandoned)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- usage -------------------------------------------------------------------------
    def _rate(
        self, job_id: str, usage: JobUsage | None, mono: float, cpu_ids: Sequence[int]
    ) -> _Rates:
        """Over the window: cores used, the busy share of each of ``cpu_ids`` (where the
        source has per-CPU accounting, cgroup v1) and cores' worth of time the job's threads
        waited for a CPU (threads seen at both ends); None when there is no window yet."""
        if usage is None:
            return None
        cpu_total = usage.cpu_seconds_total
        per_cpu = usage.cpu_seconds_per_cpu
        # Timed at the read when the source stamped it (a sampler preempted between its
        # clock and the read would otherwise see 1.1 cores in a job that uses 1.0).
        if usage.read_at is not None and self._mono is time.monotonic:
            mono = usage.read_at
        readings = self._readings.setdefault(job_id, deque())
        if readings and cpu_total < readings[-1][1]:
            readings.clear()  # a process scan lost exited processes: start a new window
        readings.append((mono, cpu_total, per_cpu, usage.run_delay_ns))
        while len(readings) > 2 and mono - readings[1][0] >= self.window_s:
            readings.popleft()
        t0, c0, p0, d0 = readings[0]
        if mono - t0 < MIN_WINDOW_S:
            return None
        dt = mono - t0
        busy: tuple[tuple[int, float], ...] = ()
        if per_cpu is not None and p0 is not None:
            busy = tuple(
                (cpu, round(min(1.0, max(0.0, (per_cpu[cpu] - p0[cpu]) / dt)), 4))
                for cpu in cpu_ids
                if cpu < len(per_cpu) and cpu < len(p0)
            )
        waiting = None
        delays = usage.run_delay_ns
        if delays is not None and d0 is not None:
            waited = 0.0
            for tid, (ran, delay) in delays.items():
                before = d0.get(tid)
                if before is not None:
                    waited += max(0.0, min(delay - before[1], WAIT_PER_RUN * (ran - before[0])))
            waiting = round(waited / 1e9 / dt, 4)
        return max(0.0, (cpu_total - c0) / dt), busy, waiting

    def _job_snapshot(
        self,
        job: JobOnNode,
        usage: JobUsage | None,
        mono: float,
        warnings: list[str],
        colocate: bool = True,
    ) -> tuple[JobSnapshot, bool]:
        cpu_ids = job.cpu_ids
        # The cgroup's cpuset has the kernel's CPU numbers; trust it only when it is the
        # allocation (ConstrainCores=no leaves the whole node in it).
        if usage and usage.cpu_ids and (not job.cores or len(usage.cpu_ids) == job.cores):
            cpu_ids = usage.cpu_ids
        rates = self._rate(job.job_id, usage, mono, cpu_ids)
        rate, busy, waiting = rates if rates is not None else (None, (), None)
        cores = job.cores or len(cpu_ids)
        memory = usage.memory_bytes if usage else 0
        peak = max(
            self._peaks.get(job.job_id, 0), memory, (usage.memory_peak_bytes or 0) if usage else 0
        )
        self._peaks[job.job_id] = peak
        if usage is None and job.state is JobState.RUNNING:
            warnings.append(
                f"job {job.job_id}: no usage found by {self.source.name} (no cgroup, no processes)"
            )
        snap = JobSnapshot(
            job_id=job.job_id,
            user=job.user,
            cores_allocated=cores,
            cpu_ids=tuple(cpu_ids),
            cores_used=round(rate, 4) if rate is not None else 0.0,
            memory_allocated_bytes=job.memory_bytes,
            memory_used_bytes=memory,
            memory_peak_bytes=peak,
            processes=usage.processes if usage else 0,
            cpu_pressure=usage.cpu_pressure if usage else None,
            memory_pressure=usage.memory_pressure if usage else None,
            uid=job.uid,
            colocate=colocate,
            start_time=job.start_time,
            cpu_seconds_total=usage.cpu_seconds_total if usage else None,
            state=job.state.value,
            nodes=job.nodes,
            cpu_busy=busy,
            cores_waiting=waiting,
        )
        return snap, rate is not None

    # -- the sample --------------------------------------------------------------------
    def sample(
        self,
        now: float | None = None,
        *,
        colocate: Mapping[str, bool] | None = None,
        default_colocate: bool = True,
    ) -> NodeSnapshot:
        """One snapshot of the node at ``now`` (epoch seconds; default: the wall clock).

        ``colocate`` maps job ids to their ``--colocate`` choice (True: allow; what the prolog
        and the job-choice files said); each job's snapshot carries it, ``default_colocate``
        for jobs without one, so what the metrics show is what the policy was told.
        """
        now = time.time() if now is None else now
        choices = colocate or {}
        mono = self._mono()
        warnings: list[str] = []
        refreshed = self._jobs is None and self._refresh_jobs(mono, warnings)
        reading = self._read(warnings)
        seen = frozenset(reading.jobs)
        transient = any(j.state in _TRANSIENT for j in self._jobs or ())
        due = mono - self._jobs_at >= self.slurm_refresh_s
        pending = "jobs" in self._inflight
        if not refreshed and (pending or due or transient or seen != self._last_seen):
            before = {j.job_id for j in self._jobs or ()}
            if self._refresh_jobs(mono, warnings):
                new = {j.job_id for j in self._jobs or ()} - before - set(reading.jobs)
                if new:  # a job Slurm just reported: let the source look for it too
                    reading = self._read(warnings)
                    seen = frozenset(reading.jobs)
        self._last_seen = seen
        jobs = list(self._jobs or ())
        slurm_ok = self._slurm_error is None and self._jobs is not None
        if not slurm_ok:
            warnings.append(self._slurm_error or "Slurm has not answered yet")
            jobs = [j for j in jobs if j.job_id in reading.jobs or self._maybe_alive(j, mono)]
            jobs += self._unknown_jobs(reading, {j.job_id for j in jobs}, warnings)
        info = self._node_info(mono, warnings)
        snaps: list[JobSnapshot] = []
        for job in jobs:
            allowed = choices.get(job.job_id, default_colocate)
            snap, valid = self._job_snapshot(
                job, reading.jobs.get(job.job_id), mono, warnings, allowed
            )
            snaps.append(snap)
            if valid:
                self.history.add(
                    job.job_id,
                    UsageSample(
                        now,
                        snap.cores_used,
                        snap.memory_used_bytes,
                        snap.cpu_pressure,
                        snap.memory_pressure,
                        snap.cpu_busy,
                        snap.cores_waiting or 0.0,
                    ),
                )
        live = {j.job_id for j in jobs}
        self._seen_at.update(
            (job_id, (mono, usage.source.startswith("cgroup")))
            for job_id, usage in reading.jobs.items()
        )
        self.history.retain(live)
        for state in (self._readings, self._peaks, self._seen_at):
            for job_id in [j for j in state if j not in live]:
                del state[job_id]
        node_ids = tuple(range(info.cpus))
        if all(s.cpu_ids for s in snaps):
            taken = {c for s in snaps for c in s.cpu_ids}
            cores_free = len(set(node_ids) - taken)
        else:
            cores_free = max(0, info.cpus - sum(s.cores_allocated for s in snaps))
        mem_free = max(0, info.real_memory_bytes - sum(s.memory_allocated_bytes for s in snaps))
        cpu_p, mem_p = node_pressure(self.proc)
        self._log(warnings, mono)
        return NodeSnapshot(
            node=self.node,
            t=now,
            cores_total=info.cpus,
            cpu_ids=node_ids,
            memory_total_bytes=info.real_memory_bytes,
            cores_unallocated=cores_free,
            memory_unallocated_bytes=mem_free,
            jobs=tuple(snaps),
            slurm_ok=slurm_ok,
            warnings=tuple(dict.fromkeys(warnings)),
            cpu_pressure=cpu_p,
            memory_pressure=mem_p,
            source=self.source.name,
        )

    def _maybe_alive(self, job: JobOnNode, mono: float) -> bool:
        """A known job the source does not see now: alive unless its cgroup went away or
        neither Slurm nor the source has seen it for GONE_AFTER_S."""
        seen_at, in_cgroup = self._seen_at.get(job.job_id, (0.0, False))
        return not in_cgroup and mono - max(seen_at, self._jobs_at) < GONE_AFTER_S

    def _unknown_jobs(
        self, reading: UsageReading, known: set[str], warnings: list[str]
    ) -> list[JobOnNode]:
        """Jobs the cgroups show but Slurm could not tell us about (started while it was
        down): their cpuset and memory limit stand in for the allocation, so their cores
        and memory are not taken for unallocated."""
        out = []
        for job_id, usage in reading.jobs.items():
            if job_id in known or not usage.source.startswith("cgroup"):
                continue
            ids = usage.cpu_ids or ()
            out.append(
                JobOnNode(
                    job_id=job_id,
                    user=f"uid {usage.uid}" if usage.uid is not None else "?",
                    uid=usage.uid,
                    node=self.node,
                    state=JobState.RUNNING,
                    cores=len(ids),
                    cpu_ids=ids,
                    memory_bytes=usage.memory_limit_bytes or usage.memory_bytes,
                )
            )
            warnings.append(
                f"job {job_id}: allocation read from its cgroup (Slurm did not list it)"
            )
        return out

    def _read(self, warnings: list[str]) -> UsageReading:
        try:
            reading = self.source.read(self.node, self._jobs or ())
        except Exception as exc:  # a source must not raise; if one does, keep sampling
            log.debug("usage source %s failed", self.source.name, exc_info=True)
            warnings.append(f"usage source {self.source.name} failed: {type(exc).__name__}: {exc}")
            return UsageReading()
        warnings.extend(reading.warnings)
        return reading

    def _log(self, warnings: Sequence[str], mono: float) -> None:
        for w in warnings:
            last = self._logged.get(w)
            if last is None or mono - last >= self.warn_every_s:
                log.warning("%s: %s", self.node, w)
                self._logged[w] = mono
        if len(self._logged) > 1000:
            self._logged.clear()


def default_source(
    cgroup_root: str | Path = "/sys/fs/cgroup", proc: str | Path = "/proc", psi_groups: bool = False
) -> UsageSource:
    """The cgroup source this machine has (v1 or v2), with the psutil scan as fallback.

    ``psi_groups`` (v1 only, opt-in): give each job a tracking group in the unified
    hierarchy so the kernel reports per-job PSI (see ``monitors.psi_groups``).
    """
    from monitors.cgroup_v1 import CgroupV1Source
    from monitors.cgroup_v2 import CgroupV2Source
    from monitors.procscan import FallbackSource, ProcessScanSource
    from monitors.psi_groups import PsiGroups

    scan = ProcessScanSource(proc)
    primary: UsageSource
    if CgroupV2Source.detect(cgroup_root):
        primary = CgroupV2Source(cgroup_root, proc)
    elif CgroupV1Source.detect(cgroup_root):
        unified = Path(cgroup_root) / "unified"
        groups = PsiGroups(unified, proc) if psi_groups and PsiGroups.available(unified) else None
        primary = CgroupV1Source(cgroup_root, proc, psi_groups=groups)
    else:
        return scan
    return FallbackSource(primary, scan)
