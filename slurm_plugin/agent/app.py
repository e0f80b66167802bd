"""The node agent's HTTP/JSON API, called by the broker (and by operators to revoke).

Every call but ``/healthz`` is signed with this node's key (:mod:`colocate.auth.node`):
``POST /v1/leases`` start an executor, ``PUT /v1/leases/{id}`` new expiry,
``DELETE /v1/leases/{id}`` release, ``POST /v1/leases/{id}/revoke`` take back with a grace
period, ``GET /v1/status``, ``GET /v1/evictions`` (the last leases taken back and why).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Path, Request

from colocate.auth.node import NodeVerifier
from colocate.broker.api import (
    API_PREFIX,
    LEASE_ID_PATTERN,
    AgentStatus,
    ErrorReply,
    ExpiryRequest,
    ReportedLease,
    Revoked,
    RevokeRequest,
    StartReply,
    StartRequest,
)
from colocate.broker.service import install_error_handlers
from colocate.errors import LeaseDenied, LeaseExpired
from slurm_plugin.agent.agent import Agent

LeaseId = Path(min_length=1, max_length=128, pattern=LEASE_ID_PATTERN)
_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorReply} for code in (400, 401, 404, 409, 410)
}


def create_app(agent: Agent, *, run_loop: bool = True) -> FastAPI:
    """The ASGI app for ``agent``; with ``run_loop`` its decide/evict/report loop runs in a
    thread from startup to shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = threading.Thread(target=agent.run, name="agent-loop", daemon=True)
        if run_loop:
            loop.start()
        try:
            yield
        finally:
            agent.stop()
            if run_loop:
                loop.join(timeout=5)
            agent.shutdown()

    # Only the broker (or an operator) holding this node's key: signed, timestamped, never replayed.
    key = agent._secret  # the node's own key (daemon.open_agent derives it)
    verifier = NodeVerifier(lambda name: key if name == agent.node else _unknown(name))

    async def control(request: Request) -> None:
        body = await request.body()
        verifier.verify(request.headers, request.method, request.url.path, body, agent.node)

    app = FastAPI(
        title=f"colocate node agent ({agent.node})",
        summary="Starts, renews, releases and revokes the executors of leases on one node.",
        version="1",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    install_error_handlers(app)
    guarded = [Depends(control)]

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post(f"{API_PREFIX}/leases", response_model=StartReply, dependencies=guarded)
    def start(request: StartRequest) -> StartReply:
        """Start the executor of a lease placed on this node (409 if it no longer fits or
        already expired)."""
        try:
            return agent.start_lease(request)
        except LeaseExpired as exc:  # a stale request, not a gone lease: the broker tries elsewhere
            raise LeaseDenied(str(exc)) from None

    @app.put(
        f"{API_PREFIX}/leases/{{lease_id}}", response_model=ReportedLease, dependencies=guarded
    )
    def set_expiry(request: ExpiryRequest, lease_id: str = LeaseId) -> ReportedLease:
        return agent.set_expiry(lease_id, request.expires_at).reported()

    @app.delete(f"{API_PREFIX}/leases/{{lease_id}}", response_model=Revoked, dependencies=guarded)
    def release(lease_id: str = LeaseId) -> Revoked:
        return agent.release(lease_id)

    @app.post(
        f"{API_PREFIX}/leases/{{lease_id}}/revoke", response_model=Revoked, dependencies=guarded
    )
    def revoke(request: RevokeRequest, lease_id: str = LeaseId) -> Revoked:
        """Take the lease back: grace period, then kill; in-flight calls end LeaseEvicted."""
        return agent.revoke(lease_id, request.grace_s, request.reason)

    @app.get(f"{API_PREFIX}/status", response_model=AgentStatus, dependencies=guarded)
    def status() -> AgentStatus:
        return agent.status()

    @app.get(f"{API_PREFIX}/evictions", dependencies=guarded)
    def evictions() -> list[dict[str, object]]:
        """The last leases taken back, oldest first: lease_id, reason, at, seconds, cpu_ids."""
        return agent.recent_evictions()

    return app


def _unknown(name: str) -> bytes:
    raise KeyError(name)
