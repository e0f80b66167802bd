"""The agent's reports to the broker(s): what the node offers and which leases it holds.

Split out of :mod:`slurm_plugin.agent.agent` so that how and when the agent reports (one broker
or several, every interval or on change) lives in one place. The agent calls three things:

- :meth:`Reporter.step` once per loop iteration (reports if due);
- :meth:`Reporter.until_next` to know how long it may sleep;
- :meth:`Reporter.request` when something changed outside the loop (prolog, epilog, eviction).

A report is how a restarted broker learns the node's leases again, and its reply lists leases the
broker no longer knows (released here).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from colocate.auth.node import NodeAuth
from colocate.broker.api import API_PREFIX, NodeReport, ReportReply
from colocate.errors import LeaseError

if TYPE_CHECKING:
    from slurm_plugin.agent.agent import Agent

log = logging.getLogger(__name__)


@dataclass
class _Broker:
    """What the reporter knows about one broker."""

    url: str
    down_since: float | None = None


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
        self._due = threading.Event()
        self._next_report = 0.0  # time.monotonic() of the next periodic report

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
        """Send the report to every broker; the first reply that came back (None when no broker
        could be reached). Leases any broker no longer knows are released here."""
        report = self.report()
        body = report.model_dump_json()
        first: ReportReply | None = None
        for broker in self.brokers:
            answer = self._send(http, broker, body)
            if answer is None:
                continue
            if first is None:
                first = answer
            for lease_id in answer.release:
                with contextlib.suppress(LeaseError):
                    self.agent.release(lease_id)
        return first

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
            if broker.down_since is None:
                broker.down_since = self.agent.now()
                log.warning(
                    "broker %s: report failed (%s); retrying every %.1fs",
                    broker.url,
                    exc,
                    self.interval_s,
                )
            return None
        if broker.down_since is not None:
            log.info("broker %s reachable again", broker.url)
            broker.down_since = None
        return answer

    # --- timing ----------------------------------------------------------------------------

    def step(self, http: httpx.Client, changed: bool) -> None:
        """One loop iteration: report if a lease ended (``changed``), a report was requested,
        or the interval passed."""
        if changed or self._due.is_set() or time.monotonic() >= self._next_report:
            self._due.clear()
            self.report_once(http)
            self._next_report = time.monotonic() + self.interval_s

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
