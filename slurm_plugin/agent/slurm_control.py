"""The Slurm-integrated agent's answers to the prolog and epilog hooks (the control socket).

Prolog (synchronous, bounded by the hook's deadline): learn the starting job's cores and
memory on this node from ``scontrol -o -d show job <id>`` (a few ms), hand them to the node
source as a starting job, and decide at once on the last sample: the policy evicts, with no
grace, every lease on the job's cores and, if the node's memory no longer covers the jobs
plus the leases, the newest leases until it does (reason ``job_start``). The answer goes
back once those executors are gone and their memory is free. If Slurm cannot say which
cores the job got, every lease goes (the safe side).

Epilog: the job's resources are offered at once (a decision right away and a report to the
broker), without waiting for Slurm to forget the job.

Each job's ``--colocate`` choice comes with its prolog (SPANK) and from the hooks' job-choice
files, which the agent re-reads every interval (:meth:`SlurmControl.watch_choices`): a prolog
that never reached the agent (agent restarting, socket flooded) still leaves its ``deny``,
which the next decision enforces. Jobs without one get ``agent.default_colocate``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from colocate.errors import LeaseError, SlurmUnavailable
from policies.model import EvictionReason
from slurm_plugin.agent.agent import Agent
from slurm_plugin.agent.slurm_node import SlurmNode
from slurm_plugin.control import EpilogRequest, EpilogResult, PrologRequest, PrologResult
from slurm_plugin.hooks import job_choices_allowed
from slurm_plugin.slurm.cli import CliSlurm
from slurm_plugin.slurm.parse import parse_scontrol_job_detail

log = logging.getLogger(__name__)


class SlurmControl:
    """:class:`~slurm_plugin.control.ControlHandler` of the Slurm-integrated agent.

    ``choices_dir``: where the hooks leave job choices (``jobs/`` next to the control
    socket); read once at start so an agent restarted during a job still knows its choice.
    """

    def __init__(
        self, agent: Agent, source: SlurmNode, slurm: CliSlurm, choices_dir: Path | None = None
    ) -> None:
        self.agent = agent
        self.source = source
        self.slurm = slurm
        self._lock = threading.Lock()  # one prolog decision at a time
        self.choices_dir = choices_dir
        self._known: dict[int, bool] = {}  # job id -> allowed, as last applied
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self.refresh_choices()

    def refresh_choices(self) -> list[int]:
        """Read the job-choice files again; the jobs whose choice this agent had not heard."""
        if self.choices_dir is None:
            return []
        learned: list[int] = []
        choices = {
            int(job): allowed
            for job, allowed in job_choices_allowed(self.choices_dir, self.agent.node).items()
        }
        for job_id, allowed in choices.items():
            if self._known.get(job_id) != allowed:
                self.source.set_choice(str(job_id), allowed)
                learned.append(job_id)
            self._known[job_id] = allowed
        for job_id in set(self._known) - set(choices):  # epilog removed it
            del self._known[job_id]
        return learned

    def watch_choices(self, interval_s: float) -> None:
        """Re-read the choice files every ``interval_s`` in a thread; a newly seen ``deny``
        wakes the agent loop (it evicts leases on that job's cores). Stopped by :meth:`close`."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    if self.refresh_choices():
                        self.agent.wake()
                except Exception:
                    log.warning("re-reading job choices failed", exc_info=True)

        self._watch = threading.Thread(target=loop, name="job-choices", daemon=True)
        self._watch.start()

    def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=2.0)

    def _layout(self, job_id: int) -> tuple[frozenset[int], int] | None:
        """The job's cores and memory (bytes) on this node; None when Slurm cannot tell."""
        try:
            text = self.slurm.run(["scontrol", "-o", "-d", "show", "job", str(job_id)])
        except (SlurmUnavailable, LookupError, OSError) as exc:
            log.warning(
                "prolog job %d: scontrol show job failed (%s); evicting every lease", job_id, exc
            )
            return None
        for layout in parse_scontrol_job_detail(text).items:
            if layout.node == self.agent.node:
                return frozenset(layout.cpu_ids), layout.memory_bytes
        return None

    def on_prolog(self, request: PrologRequest, deadline: float) -> PrologResult:
        started = time.monotonic()
        if request.node is not None and request.node != self.agent.node:
            log.warning(
                "prolog job %d is for node %s, this agent serves %s; ignored",
                request.job_id,
                request.node,
                self.agent.node,
            )
            return PrologResult()
        job_id = str(request.job_id)
        if request.colocate is not None:
            self.source.set_choice(job_id, request.colocate == "allow")
            self._known[request.job_id] = request.colocate == "allow"
        layout = self._layout(request.job_id)
        before = {lease.lease_id for lease in self.agent.report().leases}
        with self._lock:
            if layout is None:
                self.source.job_starting(job_id, frozenset(), 0, self.agent.now())
                for lease_id in sorted(before):
                    with contextlib.suppress(LeaseError):  # released meanwhile
                        self.agent.revoke(lease_id, grace_s=0.0, reason=EvictionReason.JOB_START)
            else:
                cpu_ids, memory = layout
                self.source.job_starting(job_id, cpu_ids, memory, self.agent.now())
            self.agent.tick(sample=False)  # evicts what conflicts, synchronously
        after = {lease.lease_id for lease in self.agent.report().leases}
        waited = time.monotonic() - started
        return PrologResult(
            evicted=tuple(sorted(before - after)),
            waited_s=waited,
            complete=time.monotonic() <= deadline,
        )

    def on_epilog(self, request: EpilogRequest) -> EpilogResult:
        if request.node is not None and request.node != self.agent.node:
            return EpilogResult()
        self.source.job_ended(str(request.job_id))
        self.agent.tick(sample=False)
        self.agent.request_report()
        report = self.agent.report()
        return EpilogResult(
            offered_cores=len(report.cpu_ids), offered_memory_bytes=report.memory_bytes
        )

    def status(self) -> Mapping[str, Any]:
        data = dict(self.agent.status().model_dump(mode="json"))
        data["evictions"] = self.agent.recent_evictions()
        snapshot = self.source.last_snapshot
        if snapshot is not None:
            data["jobs"] = [
                {
                    "job_id": job.job_id,
                    "cpu_ids": list(job.cpu_ids),
                    "cores_used": job.cores_used,
                    "memory_used_bytes": job.memory_used_bytes,
                    "memory_allocated_bytes": job.memory_allocated_bytes,
                    "cpu_pressure": job.cpu_pressure,
                    "memory_pressure": job.memory_pressure,
                    "cores_waiting": job.cores_waiting,
                    "cpu_busy": {str(c): b for c, b in job.cpu_busy},
                    "colocate": self.source.monitored.colocate.get(
                        job.job_id, self.source.default_colocate
                    ),
                }
                for job in snapshot.jobs
            ]
            data["slurm_ok"] = snapshot.slurm_ok
        return data
