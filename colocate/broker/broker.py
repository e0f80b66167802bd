"""The lease broker: places leases on nodes, asks their agents to start executors, signs tokens.

State is soft: a :class:`~policies.leasebook.LeaseBook` rebuilt from agent reports, so a
restarted broker knows every live lease again after one report interval. Invocations never
pass through here: clients talk to the executor at the address a grant names.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx

from colocate.broker.api import (
    API_PREFIX,
    CONTROL_HEADER,
    BrokerStatus,
    ExpiryRequest,
    LeaseGrant,
    LeaseInfo,
    LeaseRequest,
    NodeInfo,
    NodeReport,
    Released,
    RenewRequest,
    ReportReply,
    StartReply,
    StartRequest,
)
from colocate.broker.secret import control_token, control_token_ok
from colocate.broker.service import raise_for_reply
from colocate.config import BrokerConfig
from colocate.errors import (
    BackendUnavailable,
    BadRequest,
    LeaseDenied,
    LeaseError,
    LeaseEvicted,
    LeaseExpired,
)
from colocate.tokens import LeaseClaims, sign_lease
from policies.leasebook import LeaseBook, LeaseEnd, LeaseRecord

log = logging.getLogger(__name__)

START_ATTEMPTS = 3  # nodes tried for one lease request before giving up


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


class Broker:
    """Lease accounting plus the calls to agents. One instance per process, one event loop.

    ``clock`` returns epoch seconds (injectable for tests); the book itself never reads it.
    """

    def __init__(self, config: BrokerConfig, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.book = LeaseBook(node_timeout_s=config.node_timeout_s)
        self._secret = secret
        self._control = control_token(secret)
        self._clock = clock
        self._http: httpx.AsyncClient | None = None
        self._max_payload: dict[str, int] = {}

    def is_control(self, presented: str | None) -> bool:
        """True when ``presented`` is the control token (the caller is an agent of this cluster)."""
        return control_token_ok(self._secret, presented)

    async def start(self) -> None:
        self._http = httpx.AsyncClient(
            timeout=self.config.agent_timeout_s, headers={CONTROL_HEADER: self._control}
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def sweep_forever(self, interval_s: float = 0.25) -> None:
        """Drop expired leases from the book (the agents evict the executors themselves)."""
        while True:
            for record in self.book.expire(self._clock()):
                log.info("lease %s on %s expired", record.lease_id, record.node)
            await asyncio.sleep(interval_s)

    # --- agents ---------------------------------------------------------------------------

    def report(self, node: str, report: NodeReport) -> ReportReply:
        """Take an agent's report; tell it which of its leases were released here."""
        release = [r.lease_id for r in report.leases if self.book.ended(r.lease_id) is LeaseEnd.RELEASED]
        reported = [
            LeaseRecord(
                r.lease_id, node, tuple(r.cpu_ids), r.memory_bytes, r.granted_at, r.expires_at,
                r.address, r.generation,
            )
            for r in report.leases
            if r.lease_id not in release
        ]
        outcome = self.book.report(
            node, report.url, report.cpu_ids, report.memory_bytes, reported, report.generation, self._clock(),
            report.instance,
        )
        if outcome.learned:
            log.info("node %s: learned live leases %s", node, ", ".join(outcome.learned))
        for record in outcome.dropped:
            log.info("node %s: lease %s is gone (evicted on the node)", node, record.lease_id)
        return ReportReply(
            node=node,
            learned=list(outcome.learned),
            dropped=[r.lease_id for r in outcome.dropped],
            release=release,
        )

    async def _agent(self, method: str, url: str, body: Any | None = None) -> Any:
        assert self._http is not None, "Broker.start() was not awaited"
        try:
            reply = await self._http.request(method, url, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"agent at {url} did not answer ({type(exc).__name__}); is the node agent running?") from None
        try:
            data = reply.json()
        except ValueError:
            data = None
        raise_for_reply(reply.status_code, data, f"agent at {url}")
        return data

    # --- clients --------------------------------------------------------------------------

    def _denied(self, request: LeaseRequest, now: float) -> LeaseDenied:
        best = self.book.best_available(now)
        if best is None:
            silent = len(self.book.nodes())
            message = (
                f"none of the {silent} registered nodes reported in the last {self.config.node_timeout_s:g}s; check their agents"
                if silent
                else "no node agent is registered; start one with `colocate agent --standalone --broker URL`"
            )
            return LeaseDenied(message, available={"cores": 0, "memory_bytes": 0, "nodes": 0})
        live = len(self.book.available(now))
        return LeaseDenied(
            f"no node has {request.cores} free cores and {_gib(request.memory)}; the best node "
            f"({best.node}) has {best.cores} cores and {_gib(best.memory_bytes)} free; ask for less or retry later",
            available={"cores": best.cores, "memory_bytes": best.memory_bytes, "nodes": live},
        )

    def _grant(self, record: LeaseRecord) -> LeaseGrant:
        token = sign_lease(
            self._secret,
            LeaseClaims(record.lease_id, record.node, record.cpu_ids, record.memory_bytes, record.expires_at),
        )
        return LeaseGrant(
            lease_id=record.lease_id,
            node=record.node,
            address=record.address,
            cpu_ids=list(record.cpu_ids),
            memory_bytes=record.memory_bytes,
            granted_at=record.granted_at,
            expires_at=record.expires_at,
            token=token,
            max_payload_bytes=self._max_payload.get(record.node, 16 * 1024**2),
        )

    async def lease(self, request: LeaseRequest) -> LeaseGrant:
        """Place, start on the node, sign. LeaseDenied when nothing fits (with what is free).

        A node whose agent cannot start the executor (down, or its offer shrank meanwhile)
        is skipped and the next fitting node tried, up to ``START_ATTEMPTS`` nodes.
        """
        failed: set[str] = set()
        last_error: Exception | None = None
        for _ in range(START_ATTEMPTS):
            now = self._clock()
            slot = self.book.place(
                request.cores, request.memory, now, self.config.placement, exclude=frozenset(failed)
            )
            if slot is None:
                break
            try:
                return await self._start_on(slot.node, slot.cpu_ids, request, now)
            except (BackendUnavailable, LeaseDenied) as exc:
                failed.add(slot.node)
                last_error = exc
        if last_error is not None:
            raise last_error
        raise self._denied(request, self._clock())

    async def _start_on(self, node: str, cpu_ids: tuple[int, ...], request: LeaseRequest, now: float) -> LeaseGrant:
        offer = self.book.node(node)
        assert offer is not None
        duration = min(request.duration, self.config.max_lease_s)
        record = LeaseRecord(f"l-{secrets.token_hex(8)}", node, cpu_ids, request.memory, now, now + duration)
        self.book.add(record)  # cores are taken now, before the agent answers
        start = StartRequest(
            lease_id=record.lease_id,
            cpu_ids=list(record.cpu_ids),
            memory_bytes=record.memory_bytes,
            granted_at=record.granted_at,
            expires_at=record.expires_at,
        )
        try:
            data = await self._agent("POST", f"{offer.url}{API_PREFIX}/leases", start.model_dump())
            started = StartReply.model_validate(data)
        except Exception as exc:
            self.book.remove(record.lease_id, LeaseEnd.START_FAILED)
            log.warning("node %s could not start lease %s: %s", node, record.lease_id, exc)
            if isinstance(exc, LeaseDenied | BackendUnavailable | BadRequest):
                raise
            raise BackendUnavailable(f"node {node} could not start the executor: {exc}") from None
        self._max_payload[node] = started.max_payload_bytes
        confirmed = self.book.confirm(record.lease_id, started.address, started.generation)
        if confirmed is None:  # expired or dropped while starting
            await self._release_on_agent(offer.url, record.lease_id)
            raise LeaseExpired("ended while its executor was starting; ask for a longer lease", lease_id=record.lease_id)
        log.info("lease %s: %d cores on %s until %.0f", record.lease_id, record.cores, node, record.expires_at)
        return self._grant(confirmed)

    def _gone(self, lease_id: str) -> LeaseError:
        why = self.book.ended(lease_id)
        if why is LeaseEnd.EXPIRED:
            return LeaseExpired("has expired; ask for a new lease", lease_id=lease_id)
        if why is LeaseEnd.EVICTED:
            return LeaseEvicted("was evicted by its node; ask for a new lease", lease_id=lease_id)
        if why is LeaseEnd.RELEASED:
            return LeaseExpired("was released; ask for a new lease", lease_id=lease_id)
        return LeaseError("is not known to this broker; ask for a new lease", lease_id=lease_id)

    def info(self, lease_id: str) -> LeaseInfo:
        record = self.book.lease(lease_id)
        if record is None:
            raise self._gone(lease_id)
        return _info(record)

    async def renew(self, lease_id: str, request: RenewRequest) -> LeaseGrant:
        """Extend to now + duration (capped); the agent learns the new expiry first."""
        record = self.book.lease(lease_id)
        if record is None:
            raise self._gone(lease_id)
        if not record.address:
            raise BadRequest(f"lease {lease_id} is still starting; renew it after the grant")
        now = self._clock()
        if record.expires_at <= now:
            raise LeaseExpired("has expired; ask for a new lease", lease_id=lease_id)
        expires_at = now + min(request.duration, self.config.max_lease_s)
        offer = self.book.node(record.node)
        if offer is None:
            raise BackendUnavailable(f"node {record.node} of lease {lease_id} is not registered")
        try:
            await self._agent(
                "PUT", f"{offer.url}{API_PREFIX}/leases/{lease_id}", ExpiryRequest(expires_at=expires_at).model_dump()
            )
        except LeaseError:
            self.book.remove(lease_id, LeaseEnd.EVICTED)
            raise LeaseEvicted("its node no longer runs it; ask for a new lease", lease_id=lease_id) from None
        renewed = self.book.renew(lease_id, expires_at)
        if renewed is None:
            raise self._gone(lease_id)
        return self._grant(renewed)

    async def release(self, lease_id: str) -> Released:
        """Give the lease back; idempotent. The executor is stopped now (or at expiry if the
        agent cannot be reached)."""
        record = self.book.remove(lease_id, LeaseEnd.RELEASED)
        if record is None:
            if self.book.ended(lease_id) is LeaseEnd.RELEASED:
                return Released(lease_id=lease_id, released=False)
            raise self._gone(lease_id)
        offer = self.book.node(record.node)
        if offer is not None:
            await self._release_on_agent(offer.url, lease_id)
        return Released(lease_id=lease_id, released=True)

    async def _release_on_agent(self, url: str, lease_id: str) -> None:
        try:
            await self._agent("DELETE", f"{url}{API_PREFIX}/leases/{lease_id}")
        except (BackendUnavailable, LeaseError) as exc:
            log.info("release of %s on %s: %s (the agent reports it later)", lease_id, url, exc)

    def status(self) -> BrokerStatus:
        now = self._clock()
        nodes = []
        for offer in self.book.nodes():
            free = self.book.free(offer.node)
            nodes.append(
                NodeInfo(
                    node=offer.node,
                    url=offer.url,
                    alive=self.book.is_alive(offer.node, now),
                    cpu_ids=sorted(offer.cpu_ids),
                    memory_bytes=offer.memory_bytes,
                    free_cpu_ids=list(free.cpu_ids),
                    free_memory_bytes=free.memory_bytes,
                    reported_at=offer.reported_at,
                )
            )
        return BrokerStatus(
            placement=self.config.placement,
            now=now,
            nodes=nodes,
            leases=[_info(r) for r in self.book.leases()],
        )


def _info(record: LeaseRecord) -> LeaseInfo:
    return LeaseInfo(
        lease_id=record.lease_id,
        node=record.node,
        address=record.address,
        cpu_ids=list(record.cpu_ids),
        memory_bytes=record.memory_bytes,
        granted_at=record.granted_at,
        expires_at=record.expires_at,
    )
