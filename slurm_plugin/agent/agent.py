"""The node agent: offers the node's idle resources to the broker and runs its leases.

One loop, every ``interval_s`` (and right after any change):

1. the :class:`~slurm_plugin.agent.node_source.NodeSource` describes the node; the agent adds
   its leases and the policy decides the offer and the evictions (expired leases, leases on
   cores or memory the node took back) -- pure code, ``now`` passed in;
2. evictions are applied through the executor backend (grace period, then kill);
3. the offer and the live leases are reported to the broker (which is how a restarted broker
   learns them again).

The broker calls the agent's HTTP API (:mod:`slurm_plugin.agent.app`) to start an executor for a
lease, change its expiry, release or revoke it. The agent checks every start against its own
current offer, so a stale broker can never make it overcommit.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from colocate.broker.api import (
    AgentStatus,
    NodeReport,
    ReportedLease,
    ReportReply,
    Revoked,
    StartReply,
    StartRequest,
)
from colocate.broker.secret import control_token_ok
from colocate.errors import BadRequest, LeaseDenied, LeaseError, LeaseExpired
from colocate.lease_value import LeaseValue
from colocate.protocol import DEFAULT_MAX_PAYLOAD_BYTES
from policies.headroom import growth_suspected
from policies.limits import Limits
from policies.model import Eviction, EvictionReason, NodeView, Offer, Policy
from slurm_plugin.agent.node_source import NodeSource
from slurm_plugin.agent.reporter import Reporter

if TYPE_CHECKING:
    from colocate.metrics import AgentMetrics
    from slurm_plugin.agent.recorder import DecisionRecorder

log = logging.getLogger(__name__)

#: How many past evictions the agent's status lists.
EVICTION_LOG_SIZE = 100
#: While a job's growth into a lent core is suspected but not yet confirmed, the next sample
#: comes after ``interval_s / GROWTH_RECHECK_DIVISOR`` (unless ``growth_recheck_s`` says
#: otherwise) instead of a whole interval.
GROWTH_RECHECK_DIVISOR = 4


class ExecutorHandleLike(Protocol):
    """A running executor as the agent sees it (``colocate.executor.ExecutorHandle``)."""

    @property
    def lease_id(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def pids(self) -> tuple[int, ...]: ...
    @property
    def cpu_ids(self) -> tuple[int, ...]: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def adopted(self) -> bool:
        """Started by a previous agent on this node and adopted at this one's start."""
        ...


class ExecutorBackend(Protocol):
    """What the agent needs from the executors (``colocate.executor.ExecutorSupervisor``).

    Every member is required: a backend that has nothing to do for one (no renewal to
    pass on, no invocation counts) implements it as a no-op. The agent never probes.
    """

    def start(self, lease: LeaseValue) -> ExecutorHandleLike:
        """Start the executor of ``lease`` (its cores, memory and expiry); its workers run as
        ``lease.owner`` (None: the backend's default)."""
        ...

    def evict(self, lease_id: str, grace_s: float = 0.0, reason: str = "evicted") -> float: ...
    def renew(self, lease_id: str, expires_at: float) -> None:
        """The lease now ends at ``expires_at`` (epoch seconds): its workers live on."""
        ...

    def handles(self) -> Sequence[ExecutorHandleLike]: ...
    def exited(self) -> dict[str, tuple[int, ...]]: ...
    def drain_invocations(self) -> list[dict[str, Any]]:
        """The workers' invocation counts since the last call (``InvocationTally`` JSON)."""
        ...

    def adopt_or_cleanup(self) -> list[str]: ...
    @property
    def detached(self) -> bool:
        """True when the executors are left running for the next agent (a restart)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A lease whose executor runs on this node: the lease (the one internal value), where
    its executor listens and its processes, and ``generation``, the agent's change counter
    right after the executor started."""

    lease: LeaseValue
    address: str
    generation: int
    pids: tuple[int, ...] = ()

    @property
    def lease_id(self) -> str:
        return self.lease.lease_id

    def reported(self) -> ReportedLease:
        """The edge to the broker: this lease as the agent reports it."""
        return ReportedLease.of(self.lease, self.address, self.generation)


@dataclass(frozen=True, slots=True)
class EvictionRecord:
    """One lease taken back: why (an ``EvictionReason`` value), when (epoch seconds) and how long until its executor was gone and its
    memory free (seconds; NaN if the eviction failed)."""

    lease_id: str
    reason: str
    at: float
    seconds: float
    cpu_ids: tuple[int, ...] = ()
    memory_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_ids"] = list(self.cpu_ids)
        data["seconds"] = self.seconds if self.seconds == self.seconds else None
        return data


class Agent:
    """The node agent's state and loop; thread-safe (HTTP handlers run in a thread pool).

    ``url`` is the agent's own API as the broker must call it; ``clock`` gives epoch seconds.
    """

    def __init__(
        self,
        source: NodeSource,
        policy: Policy,
        executors: ExecutorBackend,
        *,
        secret: bytes,
        url: str,
        broker_url: str,
        broker_urls: Sequence[str] = (),
        limits: Limits | None = None,
        interval_s: float = 1.0,
        eviction_grace_s: float = 1.0,
        growth_recheck_s: float | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        clock: Callable[[], float] = time.time,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.source = source
        self.node = source.node
        self.policy = policy
        self.limits = limits or Limits()
        self.executors = executors
        self.url = url.rstrip("/")
        self.broker_url = broker_url.rstrip("/")
        self.interval_s = interval_s
        self.eviction_grace_s = eviction_grace_s
        self.growth_recheck_s = (
            interval_s / GROWTH_RECHECK_DIVISOR if growth_recheck_s is None else growth_recheck_s
        )
        self.max_payload_bytes = max_payload_bytes
        self._secret = secret
        self._clock = clock
        self._lock = threading.RLock()
        self._leases: dict[str, HeldLease] = {}
        self._generation = 0
        self.instance = secrets.token_hex(8)  # tells the broker when this agent restarted
        self._offer = Offer()
        self._policy_state: object | None = None
        self._growth_suspected = False  # the last decision saw growth the next sample may confirm
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.metrics = metrics
        self.evictions: deque[EvictionRecord] = deque(maxlen=EVICTION_LOG_SIZE)
        self.recorder: DecisionRecorder | None = None  # set by the daemon when recording
        # Reports to the broker(s): slurm_plugin.agent.reporter
        self.reporter = Reporter(self, [broker_url, *broker_urls], interval_s)

    # --- identity -------------------------------------------------------------------------

    def now(self) -> float:
        """The agent's clock (epoch seconds)."""
        return self._clock()

    def is_control(self, presented: str | None) -> bool:
        return control_token_ok(self._secret, presented)

    # --- startup ----------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Call once before serving: adopt the executors a previous agent run left that are still
        valid (lease not expired, cores not held by a job now: their clients see no error) and
        clean up the rest (their clients get LeaseEvicted or ExecutorLost), then make the first
        offer. Returns the lease ids cleaned."""
        cleaned = self.executors.adopt_or_cleanup()
        if cleaned:
            log.info(
                "cleaned up executors of leases %s left by a previous agent", ", ".join(cleaned)
            )
        now = self._clock()
        view = self.source.view(now)
        job_cpus = {c for job in view.jobs for c in job.cpu_ids}
        for handle in list(self.executors.handles()):  # executors the backend adopted
            cpus = tuple(sorted(handle.cpu_ids))
            expires_at = handle.expires_at
            valid = handle.adopted and expires_at > now and cpus
            if not valid or job_cpus & set(cpus) or not set(cpus) <= view.cpu_ids:
                self._evict_executor(handle.lease_id, 0.0, "evicted")  # a job holds its cores now
                continue
            with self._lock:  # its clients keep working; the broker hears of it at the next report
                self._generation += 1
                self._leases[handle.lease_id] = HeldLease(
                    LeaseValue.of(handle.lease_id, cpus, handle.memory_bytes, now, expires_at),
                    handle.address,
                    self._generation,
                    tuple(handle.pids),
                )
            log.info("lease %s: adopted its executor on cores %s", handle.lease_id, list(cpus))
        with self._lock:  # an offer before the first request, not one interval later
            self._decide(now)
        return cleaned

    # --- the broker's requests ---------------------------------------------------------------

    def start_lease(self, request: StartRequest) -> StartReply:
        """Start an executor for a lease the broker placed here, after checking it fits now."""
        now = self._clock()
        if request.expires_at <= now:
            raise LeaseExpired("expires before its executor could start", lease_id=request.lease_id)
        lease = request.lease()  # the one conversion from the HTTP side
        with self._lock:
            held = self._leases.get(lease.lease_id)
            if held is not None:  # the broker retried: same answer
                if not held.lease.same_resources(lease):
                    raise BadRequest(
                        f"lease {lease.lease_id} already runs here with other resources"
                    )
                return self._start_reply(held)
            if not self._offer.cpu_ids:
                self._decide(now)
            self._admit(lease)
            started = time.monotonic()
            handle = self.executors.start(lease)  # workers run as its owner (issue 12)
            if self.metrics is not None:
                self.metrics.cold_start(time.monotonic() - started)
            self._generation += 1
            held = HeldLease(lease, handle.address, self._generation, tuple(handle.pids))
            self._leases[lease.lease_id] = held
        # Wake the loop to watch the new expiry, but report only at the next interval: the
        # broker learns the start from this answer (and a report now would compete with the
        # client's first connection for the CPU).
        log.info(
            "lease %s: executor at %s on cores %s",
            lease.lease_id,
            held.address,
            list(lease.cpu_ids),
        )
        self._wake.set()
        return self._start_reply(held)

    def _start_reply(self, held: HeldLease) -> StartReply:
        return StartReply(
            lease_id=held.lease_id,
            address=held.address,
            pids=list(held.pids),
            generation=held.generation,
            max_payload_bytes=self.max_payload_bytes,
        )

    def _admit(self, lease: LeaseValue) -> None:
        lease_id, cpu_ids, memory_bytes = lease.lease_id, lease.cpu_ids, lease.memory_bytes
        taken = {c for held in self._leases.values() for c in held.lease.cpu_ids}
        used = sum(held.lease.memory_bytes for held in self._leases.values())
        free_cpus = sorted(self._offer.cpu_ids - taken)
        free_memory = max(0, self._offer.memory_bytes - used)
        if not set(cpu_ids) <= set(free_cpus) or memory_bytes > free_memory:
            raise LeaseDenied(
                f"node {self.node} cannot start lease {lease_id} on cores {list(cpu_ids)} with "
                f"{memory_bytes} bytes: free now are cores {free_cpus} and {free_memory} bytes",
                available={"cores": len(free_cpus), "memory_bytes": free_memory, "nodes": 1},
            )

    def set_expiry(self, lease_id: str, expires_at: float) -> HeldLease:
        """The broker renewed the lease: it now ends at ``expires_at``."""
        with self._lock:
            held = self._leases.get(lease_id)
            if held is None:
                raise LeaseError(f"does not run on node {self.node}", lease_id=lease_id)
            held = replace(held, lease=held.lease.renewed(expires_at))
            self._leases[lease_id] = held
        self.executors.renew(lease_id, expires_at)
        return held

    def release(self, lease_id: str) -> Revoked:
        """The client gave the lease back: stop its executor now."""
        return self.revoke(lease_id, grace_s=0.0, reason=EvictionReason.RELEASED)

    def revoke(
        self, lease_id: str, grace_s: float | None = None, reason: str = EvictionReason.REVOKED
    ) -> Revoked:
        """Take a lease back: in-flight invocations get ``grace_s`` seconds, then the executor
        is killed and they end with LeaseEvicted at the client."""
        with self._lock:
            held = self._leases.pop(lease_id, None)
            if held is None:
                raise LeaseError(f"does not run on node {self.node}", lease_id=lease_id)
            self._generation += 1
        grace = self.eviction_grace_s if grace_s is None else grace_s
        seconds = self._evict_executor(lease_id, grace, reason)
        log.info("lease %s %s (grace %.3fs, gone after %.3fs)", lease_id, reason, grace, seconds)
        self.evictions.append(
            EvictionRecord(
                lease_id,
                reason,
                self._clock(),
                seconds,
                held.lease.cpu_ids,
                held.lease.memory_bytes,
            )
        )
        if self.metrics is not None:
            self.metrics.evicted(reason, seconds if seconds == seconds else None)
        if (
            reason != "released"
        ):  # the broker asked for a release; it must hear of anything else now
            self.reporter.request()
            self._wake.set()
        return Revoked(lease_id=lease_id, reason=reason, seconds=seconds)

    def _evict_executor(self, lease_id: str, grace_s: float, reason: str) -> float:
        try:
            return float(self.executors.evict(lease_id, grace_s, reason))
        except Exception:
            log.exception("evicting the executor of lease %s failed", lease_id)
            return float("nan")

    # --- the loop ------------------------------------------------------------------------

    def _decide(self, now: float) -> tuple[Eviction, ...]:
        """Decide on the node source's latest sample with what the hooks said since (the
        caller holds the lock; sampling happens before, outside it: see :meth:`tick`)."""
        view = self.source.recent_view(now)
        view = replace(view, leases=tuple(held.lease.view() for held in self._leases.values()))
        decision = self.policy.decide(view, self.limits, now, self._policy_state)
        if self.recorder is not None:
            self.recorder.record(now, view, self._policy_state, decision)
        self._policy_state = decision.state
        self._offer = decision.offer
        self._growth_suspected = growth_suspected(view, self.limits, now)
        self._observe(view, now)
        return decision.evictions

    def _observe(self, view: NodeView, now: float) -> None:
        """Feed the metrics with this decision (the monitor's snapshot where there is one)."""
        if self.metrics is None:
            return
        snapshot = self.source.last_snapshot
        try:
            handles = list(self.executors.handles())
            tallies = self.executors.drain_invocations()
        except Exception:
            log.debug("metrics: executors unreadable", exc_info=True)
            handles, tallies = [], []
        self.metrics.observe(
            snapshot if snapshot is not None and snapshot.node == self.node else view,
            self._offer,
            view.leases,
            executors=[(h.lease_id, tuple(h.pids)) for h in handles],
            now=now,
        )
        if tallies:
            from colocate.metrics.events import InvocationTally

            for tally in tallies:
                try:
                    self.metrics.events.add_invocations(*InvocationTally.from_json(tally))
                except (ValueError, TypeError):
                    log.debug("metrics: bad invocation tally %r", tally)

    def tick(self, sample: bool = True) -> list[str]:
        """One decision: drop leases whose executor died, apply the policy's evictions.
        Returns the lease ids that ended. ``sample=False`` decides on the node source's most
        recent view plus what the hooks said since (no sampling: the prolog's fast path)."""
        now = self._clock()
        ended: list[str] = []
        if sample:  # outside the lock: a prolog (sample=False) is answered meanwhile
            self.source.view(now)
        with self._lock:  # a start holds the lock: handles() and the table agree
            alive = {h.lease_id for h in self.executors.handles()}
            for lease_id in [i for i in self._leases if i not in alive]:
                log.warning("lease %s: its executor is gone; dropping the lease", lease_id)
                del self._leases[lease_id]
                self._generation += 1
                ended.append(lease_id)
            evictions = self._decide(now)
        # A worker that died on its own (crash, OOM kill): its calls ended ExecutorLost; take
        # the whole lease back so its cores and memory are free and the broker hears of it.
        for lease_id in self.executors.exited():
            if lease_id not in self._leases:
                continue
            log.warning("lease %s: a worker exited on its own; evicting the lease", lease_id)
            with contextlib.suppress(LeaseError):
                self.revoke(lease_id, 0.0, EvictionReason.EXECUTOR_LOST)
                ended.append(lease_id)
        for eviction in evictions:
            grace = 0.0 if eviction.reason is EvictionReason.EXPIRED else eviction.grace_s
            try:
                self.revoke(eviction.lease_id, grace, str(eviction.reason))
                ended.append(eviction.lease_id)
            except LeaseError:
                pass  # released meanwhile
        return ended

    def report_once(self, http: httpx.Client) -> ReportReply | None:
        """Report to the broker(s) now (see :class:`~slurm_plugin.agent.reporter.Reporter`)."""
        return self.reporter.report_once(http)

    def report(self) -> NodeReport:
        return self.reporter.report()

    def run(self) -> None:
        """Loop until :meth:`stop`: decide and evict at every wake-up (each interval, each
        lease expiry, each change); report every interval and right after any lease ended."""
        with self.reporter.client() as http:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    ended = self.tick()
                    self.reporter.step(http, bool(ended))
                except Exception:
                    log.exception("agent loop iteration failed; continuing")
                self._wake.wait(self._next_wait(self.reporter.until_next()))

    def _next_wait(self, until_report_s: float) -> float:
        """Sleep until the next report or the next lease expiry, whichever comes first; a
        quarter interval (``growth_recheck_s``) at most while a job's growth into a lent core awaits its confirming
        sample (:func:`~policies.headroom.growth_suspected`), so it gets the core back sooner."""
        with self._lock:
            next_expiry = min(
                (held.lease.expires_at for held in self._leases.values()), default=None
            )
            suspected = self._growth_suspected
        wait = max(0.0, until_report_s)
        if suspected:
            wait = min(wait, self.growth_recheck_s)
        if next_expiry is not None:
            wait = min(wait, max(0.0, next_expiry - self._clock()) + 0.001)
        return wait

    def wake(self) -> None:
        """Decide now instead of at the next interval (a job's memory grew)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def shutdown(self) -> None:
        """The agent is going away: evict every lease (their calls end LeaseEvicted) and tell
        the broker the node offers nothing, so it drops the leases now, not at expiry. A backend
        that was detached (a restart: the next agent adopts its executors) keeps them all."""
        self.stop()
        if self.executors.detached:
            return
        for lease_id in list(self._leases):
            with contextlib.suppress(LeaseError):
                self.revoke(lease_id, grace_s=0.0, reason=EvictionReason.AGENT_STOPPED)
        with self._lock:
            self._offer = Offer()
            self._generation += 1
        self.reporter.final()

    def recent_evictions(self) -> list[dict[str, Any]]:
        """The last evictions, oldest first, as JSON objects (see :class:`EvictionRecord`)."""
        return [record.to_json() for record in list(self.evictions)]

    def request_report(self) -> None:
        """Report to the broker now (the offer changed outside the loop: epilog)."""
        self.reporter.request()
        self._wake.set()

    def status(self) -> AgentStatus:
        report = self.report()
        return AgentStatus(
            node=self.node,
            broker_url=self.broker_url,
            cpu_ids=report.cpu_ids,
            memory_bytes=report.memory_bytes,
            generation=report.generation,
            leases=report.leases,
        )
