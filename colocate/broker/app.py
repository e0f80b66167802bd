"""The broker's HTTP/JSON API (FastAPI; the description is at ``/openapi.json``).

Clients: ``POST /v1/leases``, ``GET /v1/leases/{id}``, ``POST /v1/leases/{id}/renew``,
``DELETE /v1/leases/{id}``, ``GET /v1/status``. Agents (with the control header):
``PUT /v1/nodes/{node}``. Prometheus: ``GET /metrics`` (cluster-wide ``colocate_broker_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Header, Path
from prometheus_client import CollectorRegistry, make_asgi_app

from colocate.broker.api import (
    API_PREFIX,
    CONTROL_HEADER,
    BrokerStatus,
    ErrorReply,
    LeaseGrant,
    LeaseInfo,
    LeaseRequest,
    NodeReport,
    Released,
    RenewRequest,
    ReportReply,
)
from colocate.broker.broker import Broker
from colocate.broker.service import install_error_handlers
from colocate.errors import LeaseDenied, LeaseError, Unauthorized
from colocate.metrics.broker import BrokerCollector

NodeName = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
LeaseId = Path(min_length=1, max_length=128)
_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorReply} for code in (400, 401, 404, 409, 410, 503)
}


def create_app(broker: Broker) -> FastAPI:
    """The ASGI app serving ``broker``; starts its HTTP client and expiry sweep on startup."""

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
    app.mount("/metrics", make_asgi_app(registry))

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post(f"{API_PREFIX}/leases", response_model=LeaseGrant)
    async def request_lease(request: LeaseRequest) -> LeaseGrant:
        """Ask for ``cores`` and ``memory`` for ``duration``; 409 LeaseDenied says what is free."""
        try:
            grant = await broker.lease(request)
        except LeaseDenied:
            metrics.record_lease_request("denied")
            raise
        except LeaseError:
            metrics.record_lease_request("failed")
            raise
        metrics.record_lease_request("granted")
        return grant

    @app.get(f"{API_PREFIX}/leases/{{lease_id}}", response_model=LeaseInfo)
    async def get_lease(lease_id: str = LeaseId) -> LeaseInfo:
        return broker.info(lease_id)

    @app.post(f"{API_PREFIX}/leases/{{lease_id}}/renew", response_model=LeaseGrant)
    async def renew_lease(request: RenewRequest, lease_id: str = LeaseId) -> LeaseGrant:
        """Extend the lease to now + ``duration``; the answer carries a new token."""
        return await broker.renew(lease_id, request)

    @app.delete(f"{API_PREFIX}/leases/{{lease_id}}", response_model=Released)
    async def release_lease(lease_id: str = LeaseId) -> Released:
        return await broker.release(lease_id)

    @app.get(f"{API_PREFIX}/status", response_model=BrokerStatus)
    async def status() -> BrokerStatus:
        return broker.status()

    @app.put(f"{API_PREFIX}/nodes/{{node}}", response_model=ReportReply)
    async def report(
        report: NodeReport,
        node: str = NodeName,
        control: str | None = Header(None, alias=CONTROL_HEADER),
    ) -> ReportReply:
        """An agent registers or re-reports its offer and live leases (soft state)."""
        if not broker.is_control(control):
            raise Unauthorized(f"node {node}: missing or wrong {CONTROL_HEADER}; agent and broker must share broker.secret_file")
        return broker.report(node, report)

    return app
