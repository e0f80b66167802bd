"""The lease broker: places leases on nodes, asks their agents to start executors, signs tokens.

State is soft: a :class:`~policies.leasebook.LeaseBook` rebuilt from agent reports, so a
restarted broker knows every live lease again after one report interval. Invocations never
pass through here: clients talk to the executor at the address a grant names.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from colocate.auth.identity import Identity
from colocate.auth.node import NodeVerifier, node_key, sign
from colocate.broker import quotas
from colocate.broker.api import (
    API_PREFIX,
    BrokerStatus,
    ExpiryRequest,
    HeartbeatReply,
    LeaseGrant,
    LeaseInfo,
    LeaseRequest,
    NodeHeartbeat,
    NodeInfo,
    NodeReport,
    OtherLease,
    Released,
    RenewRequest,
    ReportReply,
    StartReply,
    StartRequest,
)
from colocate.broker.ledger import Ledger
from colocate.broker.replies import checked_body
from colocate.config import BrokerConfig, Quota
from colocate.errors import (
    BackendUnavailable,
    BadRequest,
    Forbidden,
    LeaseDenied,
    LeaseError,
    LeaseEvicted,
    LeaseExpired,
    QuotaExceeded,
)
from colocate.owner import Owner
from colocate.protocol import DEFAULT_MAX_PAYLOAD_BYTES
from colocate.tokens import LeaseClaims, lease_key, sign_lease
from policies.leasebook import LeaseBook, LeaseEnd, LeaseRecord

log = logging.getLogger(__name__)

START_ATTEMPTS = 3  # nodes tried for one lease request before giving up
SLOW_START_S = 0.1  # an agent slower than this to start an executor is logged (INFO)
#: A retried lease request (``Idempotency-Retry``) whose lease no report showed yet waits at
#: most this long for every live node to report once more (another broker may have granted
#: it just before it died), and polls the book this often meanwhile.
RETRY_SETTLE_S = 2.0
RETRY_POLL_S = 0.05
ENDED_OWNERS_KEPT = 8192  # owners of ended leases remembered (who may hear how it ended)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


class Broker:
    """Lease accounting plus the calls to agents. One instance per process, one event loop.

    ``clock`` returns epoch seconds (injectable for tests); the book itself never reads it.
    """

    def __init__(
        self,
        config: BrokerConfig,
        secret: bytes,
        *,
        clock: Callable[[], float] = time.time,
        ledger: Ledger | None = None,
    ) -> None:
        self.config = config
        self.book = LeaseBook(node_timeout_s=config.node_timeout_s)
        self._secret = secret
        self.node_verifier = NodeVerifier(self.node_key, clock=clock)
        self._clock = clock
        self._http: httpx.AsyncClient | None = None
        self._max_payload: dict[str, int] = {}
        self.ledger = ledger
        # Owners of live leases; after a restart, those of open leases come back from the ledger.
        self._owners: dict[str, Owner] = {}
        self._ended_order: deque[str] = deque()
        # leases reports saw since the last sweep (-> ledger last_seen in one transaction)
        self._seen: dict[str, float] = {}
        self._started_at = clock()
        # lease id -> the grant being placed for an idempotent request (a duplicate waits on it)
        self._starting: dict[str, asyncio.Future[LeaseGrant]] = {}
        # nodes whose next heartbeat is answered "send your full report" (a release the
        # agent could not be told of: the report's reply tells it)
        self._resync: set[str] = set()
        if ledger is not None:
            for row in ledger.open_rows():
                self._owners[row.lease_id] = row.owner

    def node_key(self, node: str) -> bytes:
        """``node``'s own key (derived from the cluster secret): signs its lease tokens and
        the requests between the broker and its agent."""
        return node_key(
            self._secret, node
        )  # ~2 us; no cache: unauthenticated callers name nodes too

    async def start(self) -> None:
        # Connections to agents stay open a minute (httpx's default 5 s re-connected to a
        # node placed on every few seconds), closed before the agents' 75 s keep-alive.
        self._http = httpx.AsyncClient(
            timeout=self.config.agent_timeout_s,
            limits=httpx.Limits(max_keepalive_connections=None, keepalive_expiry=60.0),
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def sweep_forever(self, interval_s: float = 0.25) -> None:
        """Drop expired leases from the book (the agents evict the executors themselves)."""
        next_reconcile = 0.0
        while True:
            now = self._clock()
            self._flush_seen()
            # re-indexes the nodes whose offer changed since (LeaseBook.place would, on the
            # lease path): after 10,000 agents registered, the first placement took 60 ms
            self.book.best_available(now)
            for record in self.book.expire(now):
                log.info("lease %s on %s expired", record.lease_id, record.node)
                self._ended(record.lease_id, record.expires_at, "expired")
            if now >= next_reconcile:
                self._reconcile(now)
                next_reconcile = now + 5.0
            await asyncio.sleep(interval_s)

    def _flush_seen(self) -> None:
        """Write when reports last saw each lease (dated by the oldest report in the batch:
        the ledger never charges past what an agent said)."""
        if self.ledger is not None and self._seen:
            seen, self._seen = self._seen, {}
            self.ledger.seen(seen, min(seen.values()))

    def _ended(self, lease_id: str, end: float, reason: str) -> None:
        # The owner is kept a while after the end: the owner hears "expired", others "forbidden".
        self._ended_order.append(lease_id)
        while len(self._ended_order) > ENDED_OWNERS_KEPT:
            old = self._ended_order.popleft()
            if self.book.lease(old) is None:
                self._owners.pop(old, None)
        if self.ledger is not None:
            self.ledger.close(lease_id, end, reason)

    def _reconcile(self, now: float) -> None:
        """Close ledger rows of leases no agent reports any more (the broker was down when
        they ended): at their expiry if past it, else as lost at the last time seen."""
        if self.ledger is None:
            return
        settled = now - self._started_at > 2 * self.config.node_timeout_s
        for row in self.ledger.open_rows():
            if self.book.lease(row.lease_id) is not None:
                continue
            if row.expires_at <= now:
                self._ended(row.lease_id, row.expires_at, "expired")
            elif settled and now - row.last_seen > 2 * self.config.node_timeout_s:
                # (recently seen: another broker sharing the ledger granted it, or its node's
                # next report is on the way)
                self._ended(row.lease_id, row.last_seen, "lost")

    # --- agents ---------------------------------------------------------------------------

    def report(self, node: str, report: NodeReport) -> ReportReply:
        """Take an agent's report; tell it which of its leases were released here."""
        release = [
            r.lease_id for r in report.leases if self.book.ended(r.lease_id) is LeaseEnd.RELEASED
        ]
        reported = [
            LeaseRecord(
                r.lease_id,
                node,
                tuple(r.cpu_ids),
                r.memory_bytes,
                r.granted_at,
                r.expires_at,
                r.address,
                r.generation,
            )
            for r in report.leases
            if r.lease_id not in release
        ]
        outcome = self.book.report(
            node,
            report.url,
            report.cpu_ids,
            report.memory_bytes,
            reported,
            report.generation,
            self._clock(),
            report.instance,
        )
        now = self._clock()
        if outcome.learned:
            log.info("node %s: learned live leases %s", node, ", ".join(outcome.learned))
            for lease_id in outcome.learned:
                self._owner_of(lease_id)
        for record in outcome.dropped:
            log.info("node %s: lease %s is gone (evicted on the node)", node, record.lease_id)
            self._ended(
                record.lease_id,
                min(now, record.expires_at),
                "expired" if record.expires_at <= now else "evicted",
            )
        if self.ledger is not None and reported:
            self._seen.update(dict.fromkeys((r.lease_id for r in reported), now))
        return ReportReply(
            node=node,
            learned=list(outcome.learned),
            dropped=[r.lease_id for r in outcome.dropped],
            release=release,
        )

    def heartbeat(self, node: str, beat: NodeHeartbeat) -> HeartbeatReply:
        """An agent with nothing new is alive: keeps its offer fresh without the full report
        (a fraction of its cost). Not known: the agent sends its full report at once."""
        if node in self._resync:
            self._resync.discard(node)
            return HeartbeatReply(known=False)
        now = self._clock()
        if not self.book.touch(node, beat.instance, now):
            return HeartbeatReply(known=False)
        if self.ledger is not None:
            for record in self.book.leases(node):
                self._seen[record.lease_id] = now
        return HeartbeatReply(known=True)

    async def _agent(self, node: str, method: str, url: str, body: Any | None = None) -> Any:
        """Call ``node``'s agent, signed with that node's key."""
        assert self._http is not None, "Broker.start() was not awaited"
        content = json.dumps(body).encode() if body is not None else b""
        headers = sign(self.node_key(node), node, method, urlsplit(url).path, content)
        if body is not None:
            headers["content-type"] = "application/json"
        try:
            reply = await self._http.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"agent at {url} did not answer ({type(exc).__name__}); is the node agent running?"
            ) from None
        return checked_body(reply, f"agent at {url}")

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
        owner = self._owners.get(record.lease_id)
        key = self.node_key(record.node)  # the node's verifier holds only its own key
        token = sign_lease(
            key,
            LeaseClaims(
                record.lease_id,
                record.node,
                record.cpu_ids,
                record.memory_bytes,
                record.expires_at,
                owner.user if owner else "",
            ),
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
            max_payload_bytes=self._max_payload.get(record.node, DEFAULT_MAX_PAYLOAD_BYTES),
            user=owner.user if owner else "",
            account=owner.account if owner else "",
            lease_key=lease_key(key, record.lease_id).hex(),
        )

    # --- who may do what --------------------------------------------------------------------

    def _owner_of(self, lease_id: str) -> Owner | None:
        """The lease's owner: known here, or from the ledger (another broker sharing it granted
        the lease, and this one learned it from its node's report)."""
        owner = self._owners.get(lease_id)
        if owner is None and self.ledger is not None:
            row = self.ledger.row(lease_id)
            if row is not None:
                owner = self._owners[lease_id] = row.owner
        return owner

    def lease_id_for(self, who: Identity | None, key: str | None) -> str:
        """A new lease's id: random, or, for a request with an idempotency key, derived from
        the caller and the key with the cluster secret -- the same on every broker of the
        cluster, so a request retried on another broker names the same lease (and the agent
        that runs it answers the start again instead of starting a second one)."""
        if not key:
            return f"l-{secrets.token_hex(8)}"
        caller = f"{who.uid}:{who.user}" if who is not None else "-"
        mac = hmac.new(self._secret, f"lease-id\0{caller}\0{key}".encode(), hashlib.sha256)
        return f"l-{mac.hexdigest()[:16]}"

    def owner_for(self, who: Identity, account: str) -> Owner:
        """The owner a new lease of ``who`` gets: the account checked against ``broker.accounts``."""
        allowed = self.config.accounts.get(who.user, self.config.accounts.get("*"))
        if allowed is None:
            if self.config.accounts and not who.admin:
                raise Forbidden(
                    f"user {who.user} has no Slurm account in broker.accounts; ask your site to add one"
                )
            return Owner(who.uid, who.gid, who.user, account or self.config.default_account)
        if not account:
            return Owner(
                who.uid, who.gid, who.user, allowed[0] if allowed else self.config.default_account
            )
        if account not in allowed and not who.admin:
            raise Forbidden(
                f"user {who.user} may not charge account {account!r}; allowed: {', '.join(allowed) or 'none'}"
            )
        return Owner(who.uid, who.gid, who.user, account)

    def _use(
        self,
        now: float,
        *,
        owner: Owner | None = None,
        account: str | None = None,
        shared: bool = True,
    ) -> quotas.Use:
        """What ``owner`` (by uid) or ``account`` holds now and used since midnight UTC.

        Held: the leases in the book (including those being started) and, when brokers share
        the ledger (PostgreSQL), the open rows other brokers wrote, which this broker's book
        learns only from the node's next report, or never when the node is not its
        (``shared`` False skips that query: no limit on what is held at once)."""
        holds: dict[str, tuple[int, int]] = {}
        for record in self.book.leases():
            held = self._owners.get(record.lease_id)
            if (
                held is None
                or (owner is not None and held.uid != owner.uid)
                or (account is not None and held.account != account)
            ):
                continue
            holds[record.lease_id] = (record.cores, record.memory_bytes)
        if shared and self.ledger is not None and self.ledger.shared:
            uid = owner.uid if owner is not None else None
            for lease_id, cores_, memory_ in self.ledger.held(now, uid=uid, account=account):
                if lease_id not in holds and self.book.ended(lease_id) is None:
                    holds[lease_id] = (cores_, memory_)
        cores = sum(c for c, _ in holds.values())
        memory = sum(m for _, m in holds.values())
        count = len(holds)
        today = 0.0
        if self.ledger is not None:
            midnight = float(calendar.timegm((*time.gmtime(now)[:3], 0, 0, 0)))
            if owner is not None:
                today = self.ledger.core_seconds_since(midnight, now, user=owner.user)
            else:
                today = self.ledger.core_seconds_since(midnight, now, account=account)
        return quotas.Use(cores, memory, count, today)

    def _check_quotas(
        self, owner: Owner, cores: int, memory: int, duration: float, now: float, *, new: bool
    ) -> None:
        config = self.config.quotas
        user_quota = quotas.quota_for(config, user=owner.user)
        quotas.check(
            user_quota,
            self._use(now, owner=owner, shared=_limits_held(user_quota)),
            f"user {owner.user}",
            cores=cores,
            memory_bytes=memory,
            duration_s=duration,
            new_lease=new,
        )
        account_quota = quotas.quota_for(config, account=owner.account)
        quotas.check(
            account_quota,
            self._use(now, account=owner.account, shared=_limits_held(account_quota)),
            f"account {owner.account or '(none)'}",
            cores=cores,
            memory_bytes=memory,
            duration_s=duration,
            new_lease=new,
        )

    def _duration(self, duration: float) -> float:
        """``duration``, or QuotaExceeded (429) past ``broker.max_lease_s``: like a QOS MaxWall,
        the site's longest lease is a limit the caller hears about, never a silent cut."""
        limit = self.config.max_lease_s
        if duration > limit:
            raise QuotaExceeded(
                f"duration {duration:g}s exceeds this broker's longest lease of {limit:g}s "
                "(broker.max_lease_s); ask for less and renew",
                limit="max_lease_s",
                used=0,
                wanted=duration,
                allowed=limit,
            )
        return duration

    # --- clients --------------------------------------------------------------------------

    async def lease(
        self,
        request: LeaseRequest,
        who: Identity | None = None,
        *,
        key: str | None = None,
        retry: bool = False,
    ) -> LeaseGrant:
        """Place, start on the node, sign. LeaseDenied when nothing fits (with what is free),
        QuotaExceeded past a user or account limit, Forbidden for an account not the user's.

        A node whose agent cannot start the executor (down, or its offer shrank meanwhile)
        is skipped and the next fitting node tried, up to ``START_ATTEMPTS`` nodes.

        ``key`` (the client's ``Idempotency-Key``) makes the request idempotent for the lease's
        life: the same key answers the same grant, on this broker or another one of the
        cluster (``retry``: the client says it sent this request before).
        """
        self._duration(request.duration)
        owner = self.owner_for(who, request.account) if who is not None else None
        lease_id = self.lease_id_for(who, key)
        if key:
            again = await self._again(lease_id, owner, retry)
            if again is not None:
                return again
            future: asyncio.Future[LeaseGrant] = asyncio.get_running_loop().create_future()
            self._starting[lease_id] = future
            try:
                grant = await self._place(request, owner, lease_id)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # retrieved: a failed first attempt is no unhandled error
                raise
            else:
                future.set_result(grant)
                return grant
            finally:
                self._starting.pop(lease_id, None)
        return await self._place(request, owner, lease_id)

    async def _again(self, lease_id: str, owner: Owner | None, retry: bool) -> LeaseGrant | None:
        """The grant an idempotent request already got (None: place it now)."""
        pending = self._starting.get(lease_id)
        if pending is not None:  # the same request is being placed right now
            try:
                return await asyncio.shield(pending)
            except LeaseError:
                return None  # the first attempt failed; this one tries again
        grant = self._granted(lease_id, owner)
        if grant is not None:
            return grant
        ended = self.book.ended(lease_id)
        if ended is not None and ended is not LeaseEnd.START_FAILED:
            raise self._gone(lease_id)  # granted once, ended since: never granted twice
        row = self.ledger.row(lease_id) if self.ledger is not None else None
        if row is not None and row.end is not None:
            raise LeaseExpired(
                f"was granted and ended ({row.end_reason}); ask for a new lease",
                lease_id=lease_id,
            )
        if not retry and row is None:
            return None
        # Retried: another broker may have granted it and died before answering. Its node
        # reports the lease to every broker; wait for one more report from every live node.
        since = self._clock()
        deadline = since + RETRY_SETTLE_S
        while True:
            grant = self._granted(lease_id, owner)
            if grant is not None:
                log.info("lease %s: a retried request gets the grant it had", lease_id)
                return grant
            now = self._clock()
            settled = all(
                o.reported_at >= since for o in self.book.nodes() if self.book.is_alive(o.node, now)
            )
            if now >= deadline or (settled and row is None):
                break
            await asyncio.sleep(RETRY_POLL_S)
        if row is not None:
            raise BackendUnavailable(
                f"lease {lease_id} was granted on node {row.node} by another broker and that "
                "node has not reported it here yet; retry in a second"
            )
        return None

    def _granted(self, lease_id: str, owner: Owner | None) -> LeaseGrant | None:
        """The grant of the live, started lease ``lease_id`` (None when it is not one)."""
        record = self.book.lease(lease_id)
        if record is None or not record.address:
            return None
        held = self._owner_of(lease_id)
        if owner is not None and held is not None and held.uid != owner.uid:
            raise Forbidden(f"lease {lease_id} belongs to another user")
        if owner is not None and held is None:
            self._owners[lease_id] = owner
            if self.ledger is not None:
                # Learned from its node's report (the broker that placed it died before
                # answering, maybe before writing it down): the ledger gets it now, once.
                self.ledger.open(
                    lease_id,
                    owner,
                    record.node,
                    record.cores,
                    record.memory_bytes,
                    record.granted_at,
                    record.expires_at,
                )
        return self._grant(record)

    async def _place(self, request: LeaseRequest, owner: Owner | None, lease_id: str) -> LeaseGrant:
        if owner is not None:
            self._check_quotas(
                owner, request.cores, request.memory, request.duration, self._clock(), new=True
            )
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
                return await self._start_on(slot.node, slot.cpu_ids, request, now, owner, lease_id)
            except (BackendUnavailable, LeaseDenied) as exc:
                failed.add(slot.node)
                last_error = exc
                if isinstance(exc, BackendUnavailable):
                    # That agent may have started it after all: another node gets another id.
                    lease_id = self.lease_id_for(None, None)
        if last_error is not None:
            raise last_error
        raise self._denied(request, self._clock())

    async def _start_on(
        self,
        node: str,
        cpu_ids: tuple[int, ...],
        request: LeaseRequest,
        now: float,
        owner: Owner | None,
        lease_id: str,
    ) -> LeaseGrant:
        offer = self.book.node(node)
        assert offer is not None
        record = LeaseRecord(lease_id, node, cpu_ids, request.memory, now, now + request.duration)
        self.book.add(record)  # cores are taken now, before the agent answers
        if owner is not None:
            self._owners[record.lease_id] = owner
        start = StartRequest.placing(record, owner)
        try:
            asked = time.perf_counter()
            data = await self._agent(
                node, "POST", f"{offer.url}{API_PREFIX}/leases", start.model_dump()
            )
            took = time.perf_counter() - asked
            if took >= SLOW_START_S:
                log.info("lease %s: node %s took %.0f ms to start it", lease_id, node, took * 1e3)
            started = StartReply.model_validate(data)
        except Exception as exc:
            self.book.remove(record.lease_id, LeaseEnd.START_FAILED)
            self._owners.pop(record.lease_id, None)
            log.warning("node %s could not start lease %s: %s", node, record.lease_id, exc)
            if isinstance(exc, LeaseDenied | BackendUnavailable | BadRequest):
                raise
            raise BackendUnavailable(f"node {node} could not start the executor: {exc}") from None
        self._max_payload[node] = started.max_payload_bytes
        confirmed = self.book.confirm(record.lease_id, started.address, started.generation)
        if confirmed is None:  # expired or dropped while starting
            self._owners.pop(record.lease_id, None)
            await self._release_on_agent(node, offer.url, record.lease_id)
            raise LeaseExpired(
                "ended while its executor was starting; ask for a longer lease",
                lease_id=record.lease_id,
            )
        if owner is not None and self.ledger is not None:
            self.ledger.open(
                record.lease_id,
                owner,
                node,
                record.cores,
                record.memory_bytes,
                record.granted_at,
                record.expires_at,
            )
        log.info(
            "lease %s: %d cores on %s until %.0f for %s",
            record.lease_id,
            record.cores,
            node,
            record.expires_at,
            owner.label() if owner else "?",
        )
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

    def _record(self, lease_id: str, who: Identity | None, action: str) -> LeaseRecord | None:
        """The lease (None once ended), after checking ``who`` may act on it. A lease nobody
        knows is "not known"; another user's, live or ended, is Forbidden without details."""
        record = self.book.lease(lease_id)
        if who is not None and not who.admin:
            owner = self._owner_of(lease_id)
            if owner is None and record is None and self.book.ended(lease_id) is None:
                raise self._gone(lease_id)
            if owner is None or owner.uid != who.uid:
                raise Forbidden(
                    f"lease {lease_id}: {who.user} may not {action} it (not the owner, not an admin)"
                )
        return record

    def info(self, lease_id: str, who: Identity | None = None) -> LeaseInfo:
        record = self._record(lease_id, who, "see")
        if record is None:
            raise self._gone(lease_id)
        return self._info(record)

    async def renew(
        self, lease_id: str, request: RenewRequest, who: Identity | None = None
    ) -> LeaseGrant:
        """Extend to now + duration; the agent learns the new expiry first. The grant carries
        a new token, and the executor refuses the old one from then on."""
        record = self._record(lease_id, who, "renew")
        if record is None:
            raise self._gone(lease_id)
        if not record.address:
            raise BadRequest(f"lease {lease_id} is still starting; renew it after the grant")
        now = self._clock()
        if record.expires_at <= now:
            raise LeaseExpired("has expired; ask for a new lease", lease_id=lease_id)
        duration = self._duration(request.duration)
        owner = self._owners.get(lease_id)
        if owner is not None and who is not None:
            self._check_quotas(owner, record.cores, record.memory_bytes, duration, now, new=False)
        expires_at = now + duration
        offer = self.book.node(record.node)
        if offer is None:
            raise BackendUnavailable(f"node {record.node} of lease {lease_id} is not registered")
        try:
            await self._agent(
                record.node,
                "PUT",
                f"{offer.url}{API_PREFIX}/leases/{lease_id}",
                ExpiryRequest(expires_at=expires_at).model_dump(),
            )
        except LeaseError:
            self.book.remove(lease_id, LeaseEnd.EVICTED)
            self._ended(lease_id, now, "evicted")
            raise LeaseEvicted(
                "its node no longer runs it; ask for a new lease", lease_id=lease_id
            ) from None
        renewed = self.book.renew(lease_id, expires_at)
        if renewed is None:
            raise self._gone(lease_id)
        if self.ledger is not None:
            self.ledger.renew(lease_id, expires_at, now)
        return self._grant(renewed)

    async def release(self, lease_id: str, who: Identity | None = None) -> Released:
        """Give the lease back; idempotent. The executor is stopped now (or at expiry if the
        agent cannot be reached)."""
        self._record(lease_id, who, "release")
        record = self.book.remove(lease_id, LeaseEnd.RELEASED)
        if record is None:
            if self.book.ended(lease_id) is LeaseEnd.RELEASED:
                return Released(lease_id=lease_id, released=False)
            row = self.ledger.row(lease_id) if self.ledger is not None else None
            offer = self.book.node(row.node) if row is not None and row.end is None else None
            if row is None or offer is None:
                raise self._gone(lease_id)
            # Granted by another broker sharing the ledger; its node has not reported it here
            # yet (that broker may be gone): stop it on the node all the same.
            self.book.forget(lease_id, LeaseEnd.RELEASED)
            self._ended(lease_id, self._clock(), "released")
            await self._release_on_agent(row.node, offer.url, lease_id)
            return Released(lease_id=lease_id, released=True)
        self._ended(lease_id, self._clock(), "released")
        offer = self.book.node(record.node)
        if offer is not None:
            await self._release_on_agent(record.node, offer.url, lease_id)
        return Released(lease_id=lease_id, released=True)

    async def _release_on_agent(self, node: str, url: str, lease_id: str) -> None:
        try:
            await self._agent(node, "DELETE", f"{url}{API_PREFIX}/leases/{lease_id}")
        except (BackendUnavailable, LeaseError) as exc:
            log.info("release of %s on %s: %s (the agent reports it later)", lease_id, url, exc)
            self._resync.add(node)

    def leases(self, who: Identity | None = None, node: str | None = None) -> list[LeaseInfo]:
        """The caller's live leases (every lease for an admin), optionally on one node."""
        return [
            self._info(r)
            for r in self.book.leases(node)
            if who is None or who.admin or (self._owners.get(r.lease_id) or _NOBODY).uid == who.uid
        ]

    def status(self, who: Identity | None = None) -> BrokerStatus:
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
        mine = {info.lease_id for info in self.leases(who)}
        return BrokerStatus(
            placement=self.config.placement,
            now=now,
            nodes=nodes,
            leases=[self._info(r) for r in self.book.leases() if r.lease_id in mine],
            others=[
                OtherLease(
                    node=r.node, cores=r.cores, memory_bytes=r.memory_bytes, expires_at=r.expires_at
                )
                for r in self.book.leases()
                if r.lease_id not in mine
            ],
        )

    def _info(self, record: LeaseRecord) -> LeaseInfo:
        owner = self._owners.get(record.lease_id)
        return LeaseInfo(
            lease_id=record.lease_id,
            node=record.node,
            address=record.address,
            cpu_ids=list(record.cpu_ids),
            memory_bytes=record.memory_bytes,
            granted_at=record.granted_at,
            expires_at=record.expires_at,
            user=owner.user if owner else "",
            account=owner.account if owner else "",
        )


_NOBODY = Owner(-1, -1, "")


def _limits_held(quota: Quota) -> bool:
    """Whether ``quota`` limits what is held at once (cores, memory, leases)."""
    return quota.cores is not None or quota.memory is not None or quota.leases is not None
