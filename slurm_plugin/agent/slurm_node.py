"""The Slurm-integrated node source: the live monitor plus what the prolog and epilog said.

:class:`SlurmNode` samples the node through :class:`monitors.view.MonitoredNode` (Slurm's
allocations joined with cgroup usage and history) and overlays the two things the sampler
learns too late:

- a job whose prolog runs now (``job_starting``) holds its cores and memory at once, although
  its cgroup does not exist yet and Slurm may not list it on the node for a while. It has no
  history, so the policy offers nothing of it and evicts the leases on its cores (JOB_START);
- a job whose epilog ran (``job_ended``) is gone, although Slurm still lists it as
  COMPLETING: its cores and memory may be offered at once.

``view(now)`` samples; ``recent_view(now)`` reuses the last sample with the overlay applied
(milliseconds, no Slurm call), for decisions inside a prolog that must be fast.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from monitors.snapshot import NodeSnapshot
from monitors.view import MonitoredNode
from policies.model import JobView, NodeView

log = logging.getLogger(__name__)

#: A starting job Slurm never shows on the node is forgotten after this long, seconds.
STARTING_TTL_S = 120.0
#: An ended job Slurm still lists is hidden at most this long, seconds.
ENDED_TTL_S = 600.0


class SlurmNode:
    """One Slurm node as the agent's :class:`~slurm_plugin.agent.node_source.NodeSource`.

    ``monitored`` samples the node; its ``colocate`` map (job id -> allowed) is where the
    jobs' ``--colocate`` choices go. ``monotonic`` is injectable for tests. Thread-safe for
    the overlay; samples are taken one at a time (``view`` from the agent loop, outside the
    agent's lock), and ``recent_view`` never waits for one once a first sample exists.
    """

    def __init__(
        self, monitored: MonitoredNode, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.monitored = monitored
        self.node = monitored.node
        self._mono = monotonic
        self._lock = threading.Lock()  # the overlay; held for microseconds, never while sampling
        self._sampling = threading.Lock()  # one sample at a time
        self._starting: dict[str, tuple[JobView, float]] = {}  # job id -> (view, since)
        self._ended: dict[str, float] = {}  # job id -> since
        self._last: NodeView | None = None

    @classmethod
    def live(
        cls,
        node: str,
        *,
        psi_groups: bool = False,
        default_colocate: bool = True,
        slurm_wait_s: float = 0.05,
        window_s: float = 1.0,
        slurm_backend: str = "cli",
    ) -> SlurmNode:
        """This machine's Slurm node ``node``: allocations from Slurm (``slurm_backend``: ``cli``
        or ``pyslurm``), usage from cgroups.

        A decision never waits more than ``slurm_wait_s`` for Slurm (a slow answer is picked
        up by a later sample): jobs that start or end reach the agent through the prolog and
        epilog, and a memory-growth decision must not sit behind ``squeue``. ``cores_used`` is
        measured over ``window_s`` (at least one agent interval): a job that turns a lent core
        on shows it in the next sample, and the policy's growth rule, not a long averaging
        window, tells noise from growth.
        """
        from monitors.sampler import Sampler, default_source
        from slurm_plugin.slurm import make_slurm

        sampler = Sampler(
            node,
            make_slurm(slurm_backend),
            default_source(psi_groups=psi_groups),
            slurm_wait_s=slurm_wait_s,
            window_s=window_s,
        )
        return cls(MonitoredNode(sampler, default_colocate=default_colocate))

    @property
    def last_snapshot(self) -> NodeSnapshot | None:
        """The monitor's latest snapshot (for metrics), None before the first sample."""
        return self.monitored.last_snapshot

    @property
    def default_colocate(self) -> bool:
        return self.monitored.default_colocate

    # --- what the hooks said ---------------------------------------------------------------

    def set_choice(self, job_id: str, colocate: bool) -> None:
        """The job's ``--colocate`` choice (True: allow)."""
        with self._lock:
            self.monitored.colocate[job_id] = colocate

    def job_starting(
        self, job_id: str, cpu_ids: frozenset[int], memory_bytes: int, now: float
    ) -> None:
        """A job's prolog runs on this node: it holds ``cpu_ids`` and ``memory_bytes`` from now
        (epoch seconds) on. An empty ``cpu_ids`` (Slurm did not say) is taken as every core."""
        with self._lock:
            colocate = self.monitored.colocate.get(job_id, self.monitored.default_colocate)
            view = JobView(
                job_id=job_id,
                cpu_ids=cpu_ids,
                memory_allocated_bytes=memory_bytes,
                colocate=colocate,
                start_time=now,
            )
            self._starting[job_id] = (view, self._mono())
            self._ended.pop(job_id, None)

    def job_ended(self, job_id: str) -> None:
        """A job's epilog ran: its processes are gone, its resources free."""
        with self._lock:
            self._starting.pop(job_id, None)
            self._ended[job_id] = self._mono()
            self.monitored.colocate.pop(job_id, None)

    def ended_jobs(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._ended)

    # --- NodeSource --------------------------------------------------------------------------

    def view(self, now: float) -> NodeView:
        """Sample the node (cgroups; Slurm when something changed) and apply the overlay."""
        with self._sampling:
            with self._lock:
                choices_before = dict(self.monitored.colocate)
            sampled = self.monitored.view(now)
        with self._lock:
            # MonitoredNode forgets choices of jobs that left; keep those of jobs still starting.
            for job_id, allowed in choices_before.items():
                if job_id in self._starting and job_id not in self.monitored.colocate:
                    self.monitored.colocate[job_id] = allowed
            self._last = sampled
            return self._overlay(sampled, now)

    def recent_view(self, now: float) -> NodeView:
        """The last sample with the current overlay, without sampling; samples if there is none."""
        with self._lock:
            last = self._last
            if last is not None:
                return self._overlay(last, now)
        return self.view(now)

    def _overlay(self, sampled: NodeView, now: float) -> NodeView:
        mono = self._mono()
        live = {job.job_id for job in sampled.jobs}
        for job_id, (_, since) in list(self._starting.items()):
            if mono - since > STARTING_TTL_S:
                log.warning(
                    "job %s: prolog seen %.0f s ago but Slurm never listed it here; forgetting it",
                    job_id,
                    mono - since,
                )
                del self._starting[job_id]
        for job_id, since in list(self._ended.items()):
            if (job_id not in live and job_id not in self._starting) or mono - since > ENDED_TTL_S:
                del self._ended[job_id]
        jobs: list[JobView] = []
        for job in sampled.jobs:
            if job.job_id in self._ended:
                continue
            starting = self._starting.get(job.job_id)
            if starting is not None:
                prolog = starting[0]
                if job.history and job.history[-1].t > prolog.start_time:
                    del self._starting[job.job_id]  # the monitor has seen it run since its prolog
                else:
                    # Not sampled since its prolog (or a requeued job's old history): it lends
                    # nothing yet, and holds at least what the prolog said.
                    job = replace(
                        job,
                        cpu_ids=job.cpu_ids | prolog.cpu_ids,
                        history=(),
                        start_time=prolog.start_time,
                    )
            jobs.append(job)
        for job_id, (job, _) in self._starting.items():
            if job_id not in live:
                cpus = job.cpu_ids or sampled.cpu_ids
                jobs.append(
                    replace(
                        job,
                        cpu_ids=cpus,
                        colocate=self.monitored.colocate.get(job_id, job.colocate),
                    )
                )
        return replace(sampled, jobs=tuple(jobs))

    def close(self) -> None:
        self.monitored.sampler.close()
