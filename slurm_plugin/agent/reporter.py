"""The agent's reports to the broker(s): what the node offers and which leases it holds.

Split out of :mod:`slurm_plugin.agent.agent` so that how and when the agent reports (one broker
or several, on change) lives in one place. The agent calls three things:

- :meth:`Reporter.step` once per loop iteration (each sample, every ``interval_s``);
- :meth:`Reporter.until_next` to know how long it may sleep;
- :meth:`Reporter.request` when something changed outside the loop (prolog, epilog, eviction).

Reports only on change (issue 13): the full report (offer and live leases) goes to a broker when
it differs from the last one that broker accepted -- at the next sample at the latest, at once
for a lease that ended or a :meth:`~Reporter.request` -- and otherwise a heartbeat every
``heartbeat_s`` (:data:`HEARTBEAT_INTERVALS` intervals), a few bytes the broker answers without
parsing leases. A broker that does not know the node (it restarted) or has news for it answers
the heartbeat "unknown" and gets the full report at once; a broker without the heartbeat route
gets full reports every interval as before. The full report is how a restarted broker learns
the node's leases again, and its reply lists leases the broker released (stopped here).

With several brokers each gets its reports from its own thread, one request in flight per
broker: a broker that hangs (accepts connections, never answers) costs its own thread the
request timeout, never the agent's loop nor the other brokers' reports; it gets the next
report once its request has failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from colocate.auth.node import NodeAuth
from colocate.broker.api import (
    API_PREFIX,
    HeartbeatReply,
    NodeHeartbeat,
    NodeReport,
    ReportReply,
)
from colocate.errors import LeaseError

if TYPE_CHECKING:
    from slurm_plugin.agent.agent import Agent

log = logging.getLogger(__name__)

#: Without a change, a heartbeat every this many report intervals (4 s at the default 1 s:
#: well inside the broker's ``node_timeout_s`` of 10 s).
HEARTBEAT_INTERVALS = 4


@dataclass
class _Broker:
    """What the reporter knows about one broker."""

    url: str
    down_since: float | None = None
    sent: str | None = None  # the last full report this broker accepted (its JSON)
    last_ok: float = -1e18  # time.monotonic() of its last answer
    heartbeats: bool = True  # False: it has no heartbeat route (an older broker)


class Reporter:
    """Reports one agent's node to one or more brokers (``broker_urls``, in order).

    Several brokers serve one cluster at once: each gets every report, so each knows every
    node's offer and leases, and the agent stays the authority for its cores (it refuses a
    start on a core another broker's lease holds; that broker then places the lease elsewhere).
    """

    def __init__(self, agent: Agent, broker_urls: Sequence[str], interval_s: float) -> None:
        # every broker of the cluster: a list, or URLs separated by commas ([agent] broker_url)
        urls = [p.strip().rstrip("/") for u in broker_urls for p in u.split(",") if p.strip()]
        if not urls:
            raise ValueError("agent: no broker URL (set [agent] broker_url)")
        self.agent = agent
        self.brokers = [_Broker(u) for u in dict.fromkeys(urls)]
        self.interval_s = interval_s
        #: None: a full report every interval (no heartbeats)
        self.heartbeat_s: float | None = HEARTBEAT_INTERVALS * interval_s
        self._due = threading.Event()
        self._next_report = 0.0  # time.monotonic() of the next sample's report decision
        self.counts = {"reports": 0, "heartbeats": 0}  # sent and answered
        self._counts_lock = threading.Lock()
        #: several brokers: report to each from its own thread (False: one after another, in
        #: the caller's thread; benchmarks/broker_load.py, whose thousands of simulated agents
        #: share a few threads)
        self.concurrent = True
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: dict[str, Future[ReportReply | None]] = {}

    @property
    def broker_urls(self) -> list[str]:
        return [b.url for b in self.brokers]

    # --- the report ------------------------------------------------------------------------

    def report(self) -> NodeReport:
        """The node's offer and live leases, as the broker wants them."""
        agent = self.agent
        with agent._lock:
            return NodeReport(
                url=agent.url,
                cpu_ids=sorted(agent._offer.cpu_ids),
                memory_bytes=agent._offer.memory_bytes,
                generation=agent._generation,
                instance=agent.instance,
                leases=[held.reported() for held in agent._leases.values()],
            )

    def client(self, timeout_s: float | None = None) -> httpx.Client:
        """An HTTP client signed with the node's key (the broker checks it)."""
        timeout = max(1.0, self.interval_s) if timeout_s is None else timeout_s
        return httpx.Client(timeout=timeout, auth=NodeAuth(self.agent._secret, self.agent.node))

    def report_once(self, http: httpx.Client) -> ReportReply | None:
        """Send the full report to every broker; the first reply that came back (None when
        no broker could be reached). Leases a broker released are stopped here."""
        report = self.report()
        body = report.model_dump_json()
        if self._parallel():
            pool = self._threads()
            futures = [pool.submit(self._full, http, b, body) for b in self.brokers]
            answers = [f.result() for f in futures]  # each bounded by the client's timeout
        else:
            answers = [self._full(http, b, body) for b in self.brokers]
        return next((a for a in answers if a is not None), None)

    def _parallel(self) -> bool:
        return self.concurrent and len(self.brokers) > 1

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=len(self.brokers), thread_name_prefix=f"report-{self.agent.node}"
            )
        return self._pool

    def _count(self, what: str) -> None:
        with self._counts_lock:
            self.counts[what] += 1

    def _full(self, http: httpx.Client, broker: _Broker, body: str) -> ReportReply | None:
        answer = self._send(http, broker, body)
        if answer is not None:
            broker.sent = body
            self._count("reports")
            for lease_id in answer.release:
                with contextlib.suppress(LeaseError):
                    self.agent.release(lease_id)
        return answer

    def _heartbeat(self, http: httpx.Client, broker: _Broker, report: NodeReport) -> bool:
        """True when the broker knew the node; False when it wants the full report."""
        beat = NodeHeartbeat(instance=report.instance, generation=report.generation)
        try:
            reply = http.put(
                f"{broker.url}{API_PREFIX}/nodes/{self.agent.node}/alive",
                content=beat.model_dump_json(),
                headers={"content-type": "application/json"},
            )
            if reply.status_code in (404, 405):  # an older broker: full reports only
                broker.heartbeats = False
                return False
            reply.raise_for_status()
            known = HeartbeatReply.model_validate_json(reply.content).known
        except (httpx.HTTPError, ValueError) as exc:
            self._down(broker, exc)
            return True  # unreachable: the next attempt is the next heartbeat
        self._up(broker)
        self._count("heartbeats")
        return known

    def _down(self, broker: _Broker, exc: Exception) -> None:
        if broker.down_since is None:
            broker.down_since = self.agent.now()
            log.warning(
                "broker %s: report failed (%s); retrying every %.1fs",
                broker.url,
                exc,
                self.interval_s,
            )

    def _up(self, broker: _Broker) -> None:
        broker.last_ok = time.monotonic()
        if broker.down_since is not None:
            log.info("broker %s reachable again", broker.url)
            broker.down_since = None

    def _send(self, http: httpx.Client, broker: _Broker, body: str) -> ReportReply | None:
        try:
            reply = http.put(
                f"{broker.url}{API_PREFIX}/nodes/{self.agent.node}",
                content=body,
                headers={"content-type": "application/json"},
            )
            reply.raise_for_status()
            answer = ReportReply.model_validate_json(reply.content)
        except (httpx.HTTPError, ValueError) as exc:
            self._down(broker, exc)
            broker.sent = None  # whatever it had, it gets the full report next time
            return None
        self._up(broker)
        return answer

    # --- timing ----------------------------------------------------------------------------

    def step(self, http: httpx.Client, changed: bool) -> None:
        """One loop iteration. At once when a lease ended (``changed``) or a report was
        requested, else at most once per interval: to each broker the full report if it
        differs from the one that broker has, else a heartbeat if one is due."""
        urgent = changed or self._due.is_set()
        now = time.monotonic()
        if not urgent and now < self._next_report - 0.05 * self.interval_s:
            return  # (a wake-up a hair early is the interval's: no skipped interval)
        self._due.clear()
        self._next_report = now + self.interval_s
        report = self.report()
        body = report.model_dump_json()
        if not self._parallel():
            for broker in self.brokers:
                self._step_one(http, broker, report, body, now)
            return
        pool = self._threads()
        for broker in self.brokers:
            busy = self._in_flight.get(broker.url)
            if busy is not None:
                if not busy.done():
                    continue  # still waiting on this broker: it gets the next step's decision
                failed = busy.exception()
                if failed is not None:  # not lost in the thread: the sequential path raises it
                    log.error("report to %s failed: %r", broker.url, failed)
            self._in_flight[broker.url] = pool.submit(
                self._step_one, http, broker, report, body, now
            )

    def _step_one(
        self, http: httpx.Client, broker: _Broker, report: NodeReport, body: str, now: float
    ) -> ReportReply | None:
        """To one broker: the full report if it differs from the one that broker has, else a
        heartbeat if one is due (and the full report if the broker asks for it)."""
        if (
            self.heartbeat_s is None
            or not broker.heartbeats
            or broker.sent != body
            or (
                now - broker.last_ok >= self.heartbeat_s
                and not self._heartbeat(http, broker, report)
            )
        ):
            return self._full(http, broker, body)
        return None

    def until_next(self) -> float:
        """Seconds until the next periodic report (0 when one is due)."""
        if self._due.is_set():
            return 0.0
        return max(0.0, self._next_report - time.monotonic())

    def request(self) -> None:
        """Report at the next loop iteration (the caller wakes the loop)."""
        self._due.set()

    def final(self) -> None:
        """The agent is going away: one last report, short timeout."""
        with self.client(timeout_s=1.0) as http:
            self.report_once(http)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
