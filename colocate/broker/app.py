"""The broker's HTTP/JSON API (FastAPI; the description is at ``/openapi.json``).

Clients (``Authorization: MUNGE <credential>`` or ``Bearer <Slurm JWT>``, see
:mod:`colocate.auth`): ``POST /v1/leases``, ``GET /v1/leases``, ``GET /v1/leases/{id}``,
``POST /v1/leases/{id}/renew``, ``DELETE /v1/leases/{id}``, ``GET /v1/status``,
``GET /v1/usage``. Agents (signed with their node's key, :mod:`colocate.auth.node`):
``PUT /v1/nodes/{node}`` (the full report, on change) and ``PUT /v1/nodes/{node}/alive`` (a
heartbeat otherwise). Prometheus:
``GET /metrics`` (cluster-wide ``colocate_broker_*`` and per-account ledger totals).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError, WithJsonSchema
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from colocate.auth.identity import AUTH_HEADER, Authenticator, Identity
from colocate.broker.api import (
    API_PREFIX,
    LEASE_ID_PATTERN,
    BrokerStatus,
    ErrorReply,
    HeartbeatReply,
    LeaseGrant,
    LeaseInfo,
    LeaseList,
    LeaseRequest,
    NodeHeartbeat,
    NodeReport,
    Released,
    RenewRequest,
    ReportReply,
    UsageRecord,
    UsageReport,
)
from colocate.broker.broker import Broker
from colocate.broker.ledger import Ledger
from colocate.broker.service import LoadShedder, install_error_handlers
from colocate.errors import BadRequest, ColocateError, Forbidden, LeaseDenied, LeaseError
from colocate.metrics.broker import BrokerCollector

_NODE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_ALIVE = "/alive"
_OK_HEADERS = [(b"content-type", b"application/json")]
#: The ``Idempotency-Key`` header as the OpenAPI description states it (checked by the Header).
IDEMPOTENCY_KEY_SCHEMA = {
    "type": "string",
    "minLength": 8,
    "maxLength": 128,
    "pattern": LEASE_ID_PATTERN,
}


class HeartbeatFastPath:
    """``PUT /v1/nodes/{node}/alive`` answered without FastAPI's routing, validation and
    dependency machinery: a heartbeat is most of what 10,000 agents send, and is answered from
    the book in microseconds. The same checks run (a small JSON body of the heartbeat schema,
    the node's signature over it); anything else -- a bad body, a bad signature, another
    route -- goes to the FastAPI app, which answers it as before (its errors, its 4xx)."""

    def __init__(self, app: ASGIApp, broker: Broker) -> None:
        self.app = app
        self.broker = broker
        self.prefix = f"{API_PREFIX}/nodes/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope.get("method") != "PUT"
            or not path.startswith(self.prefix)
            or not path.endswith(_ALIVE)
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more and len(body) <= 4096:
            message = await receive()
            if message["type"] != "http.request":
                return  # the agent went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
        node = path[len(self.prefix) : -len(_ALIVE)]
        reply = None
        if not more and _NODE.match(node):
            try:
                beat = NodeHeartbeat.model_validate_json(body)
                self.broker.node_verifier.verify(Headers(scope=scope), "PUT", path, body, node)
                reply = self.broker.heartbeat(node, beat)
            except (ValidationError, ColocateError):
                reply = None
        if reply is None:  # the app gives its usual answer (validation error, 401, ...)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": more}

            await self.app(scope, replay, send)
            return
        content = reply.model_dump_json().encode()
        headers = [*_OK_HEADERS, (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


NodeName = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
LeaseId = Path(min_length=1, max_length=128, pattern=LEASE_ID_PATTERN)
_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorReply} for code in (400, 401, 403, 404, 409, 410, 413, 429, 503)
}


class LedgerCollector(Collector):
    """Per-account totals of closed leases (not per user: Slurm's PrivateData spirit)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterable[CounterMetricFamily]:
        leases = CounterMetricFamily(
            "colocate_account_leases", "Closed leases per Slurm account", labels=["account"]
        )
        cores = CounterMetricFamily(
            "colocate_account_core_seconds",
            "Core-seconds of closed leases per account",
            labels=["account"],
        )
        gib = CounterMetricFamily(
            "colocate_account_memory_gib_seconds",
            "GiB-seconds of closed leases per account",
            labels=["account"],
        )
        money = CounterMetricFamily(
            "colocate_account_recovered_money",
            "Money recovered by closed leases per account",
            labels=["account"],
        )
        for account, n, core_s, gib_s, value in self.ledger.account_totals():
            leases.add_metric([account], n)
            cores.add_metric([account], core_s)
            gib.add_metric([account], gib_s)
            money.add_metric([account], value)
        yield from (leases, cores, gib, money)


def _since(day: datetime.date | None) -> float | None:
    """Midnight UTC starting ``day`` as epoch seconds."""
    if day is None:
        return None
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()


def _limit_durations(schema: dict[str, Any], max_lease_s: float) -> None:
    """State this broker's longest lease in the OpenAPI description of every duration."""
    for name in ("LeaseRequest", "RenewRequest"):
        duration = (
            schema.get("components", {})
            .get("schemas", {})
            .get(name, {})
            .get("properties", {})
            .get("duration")
        )
        for form in (duration or {}).get("anyOf", ()):
            if form.get("type") == "number":
                form["maximum"] = max_lease_s
            elif form.get("type") == "string":  # digits and a unit that cannot pass the limit
                form["pattern"] = _duration_pattern(max_lease_s)


def _duration_pattern(max_lease_s: float) -> str:
    """A duration pattern whose every match is between 1 s and ``max_lease_s``."""
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        digits = len(str(int(max_lease_s // factor))) - 1
        if digits >= 1:
            return rf"^[1-9][0-9]{{0,{digits - 1}}}{unit}$" if digits > 1 else rf"^[1-9]{unit}$"
    return r"^1s$"


def create_app(broker: Broker, authenticator: Authenticator | None = None) -> FastAPI:
    """The ASGI app serving ``broker``; starts its HTTP client and expiry sweep on startup.

    ``authenticator`` checks every client request (default: MUNGE only)."""
    auth = authenticator or Authenticator()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        sweeper = asyncio.create_task(broker.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            await broker.close()

    app = FastAPI(
        title="colocate broker",
        summary="Leases of idle HPC cores and memory for serverless functions.",
        version="1",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    install_error_handlers(app)
    registry = CollectorRegistry()
    metrics = BrokerCollector(broker.status, registry=registry)
    if broker.ledger is not None:
        registry.register(LedgerCollector(broker.ledger))
    app.mount("/metrics", make_asgi_app(registry))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            _limit_durations(schema, broker.config.max_lease_s)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(HeartbeatFastPath, broker=broker)  # inside the shedder: shed first
    app.add_middleware(
        LoadShedder, max_in_flight=broker.config.max_in_flight, shed_first=f"{API_PREFIX}/nodes/"
    )

    async def caller(  # munged answers in ~0.1 ms: not worth a thread hop
        request: Request,
        authorization: str | None = Header(
            None,
            alias=AUTH_HEADER,
            description="`MUNGE <credential>` (payload `colocate/1 METHOD PATH`) or `Bearer <Slurm JWT>`",
        ),
    ) -> Identity:
        return auth.authenticate(authorization, request.method, request.url.path)

    Caller = Depends(caller)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post(f"{API_PREFIX}/leases", response_model=LeaseGrant)
    async def request_lease(
        request: LeaseRequest,
        who: Identity = Caller,
        # An absent header is None here, but a header has no null value on the wire: the
        # description says "an optional string" (its nullable form made clients and fuzzers
        # send the text "null", refused as too short).
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                min_length=8,
                max_length=128,
                pattern=LEASE_ID_PATTERN,
                description="the same key answers the same grant for the lease's life, on any "
                "broker of the cluster: a retried request is never granted twice",
            ),
            WithJsonSchema(IDEMPOTENCY_KEY_SCHEMA),
        ] = None,
        idempotency_retry: int = Header(
            0,
            alias="Idempotency-Retry",
            ge=0,
            le=100,
            description="how many times the client sent this request before (0: first)",
        ),
    ) -> LeaseGrant:
        """Ask for ``cores`` and ``memory`` for ``duration``; 409 LeaseDenied says what is free,
        429 QuotaExceeded names the limit."""
        try:
            grant = await broker.lease(
                request, who, key=idempotency_key, retry=idempotency_retry > 0
            )
        except LeaseDenied:
            metrics.record_lease_request("denied")
            raise
        except LeaseError:
            metrics.record_lease_request("failed")
            raise
        metrics.record_lease_request("granted")
        return grant

    @app.get(f"{API_PREFIX}/leases", response_model=LeaseList)
    async def list_leases(
        who: Identity = Caller,
        node: str | None = Query(None, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$"),
    ) -> LeaseList:
        """The caller's live leases (every lease for an admin), optionally on one node."""
        return LeaseList(leases=broker.leases(who, node))

    @app.get(f"{API_PREFIX}/leases/{{lease_id}}", response_model=LeaseInfo)
    async def get_lease(lease_id: str = LeaseId, who: Identity = Caller) -> LeaseInfo:
        return broker.info(lease_id, who)

    @app.post(f"{API_PREFIX}/leases/{{lease_id}}/renew", response_model=LeaseGrant)
    async def renew_lease(
        request: RenewRequest, lease_id: str = LeaseId, who: Identity = Caller
    ) -> LeaseGrant:
        """Extend the lease to now + ``duration``; the answer carries a new token and the
        executor refuses the old one."""
        return await broker.renew(lease_id, request, who)

    @app.delete(f"{API_PREFIX}/leases/{{lease_id}}", response_model=Released)
    async def release_lease(lease_id: str = LeaseId, who: Identity = Caller) -> Released:
        return await broker.release(lease_id, who)

    @app.get(f"{API_PREFIX}/status", response_model=BrokerStatus)
    async def status(who: Identity = Caller) -> BrokerStatus:
        """Nodes and free capacity; the caller's leases in full, others' without ids."""
        return broker.status(who)

    @app.get(f"{API_PREFIX}/usage", response_model=UsageReport)
    async def usage(
        who: Identity = Caller,
        user: str | None = Query(None, max_length=64),
        account: str | None = Query(None, max_length=64),
        since: Annotated[
            datetime.date | None, Query(description="leases that ran on or after this day (UTC)")
        ] = None,
    ) -> UsageReport:
        """Ledger records (like ``sreport``): a user sees their own, an admin everyone's."""
        if broker.ledger is None:
            raise BadRequest("this broker keeps no ledger (broker.ledger is empty)")
        if not who.admin:
            if user is not None and user != who.user:
                raise Forbidden(f"{who.user} may not see the usage of {user}; only admins may")
            user = who.user
        rows = broker.ledger.rows(user=user, account=account, since=_since(since))
        return UsageReport(
            since=_since(since),
            currency=broker.ledger.prices.currency,
            records=[UsageRecord(**row.to_json()) for row in rows],
        )

    async def node_signed(request: Request, node: str = NodeName) -> str:
        """The request is signed by ``node``'s own agent (see :mod:`colocate.auth.node`)."""
        body = await request.body()
        return broker.node_verifier.verify(
            request.headers, request.method, request.url.path, body, node
        )

    @app.put(f"{API_PREFIX}/nodes/{{node}}", response_model=ReportReply)
    async def report(report: NodeReport, node: str = Depends(node_signed)) -> ReportReply:
        """An agent registers or re-reports its offer and live leases (soft state); signed
        with its node's key, timestamped, never replayed."""
        return broker.report(node, report)

    @app.put(f"{API_PREFIX}/nodes/{{node}}/alive", response_model=HeartbeatReply)
    async def heartbeat(beat: NodeHeartbeat, node: str = Depends(node_signed)) -> HeartbeatReply:
        """An agent whose offer and leases did not change since its last report is alive;
        ``known: false`` asks for the full report now. Signed like the report."""
        return broker.heartbeat(node, beat)

    return app
