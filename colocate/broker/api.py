"""The broker's and the node agents' HTTP/JSON messages (pydantic, unknown keys refused).

Shared by the broker, the agent and the client so the three cannot drift apart; FastAPI turns
them into the OpenAPI description at ``/openapi.json``. Units: bytes, seconds (epoch for
instants), cores; core ids are kernel CPU numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from colocate.errors import ConfigError
from colocate.units import parse_duration, parse_size

API_PREFIX = "/v1"
CONTROL_HEADER = "X-Colocate-Control"  # HMAC of the cluster secret: agents <-> broker only


def _text_via(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    """A pydantic before-validator reading strings with ``parse`` (a units parser)."""

    def validate(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    return validate


_size = _text_via(parse_size)
_duration = _text_via(parse_duration)


Bytes = Annotated[int, BeforeValidator(_size), Field(ge=0, description='bytes, or a size like "512MiB"')]
Seconds = Annotated[float, BeforeValidator(_duration), Field(gt=0, description='seconds, or a duration like "5m"')]
CpuIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=4096)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorReply(_Message):
    """Every 4xx/5xx body: ``error`` names the colocate exception class, ``message`` says what to do."""

    error: str
    message: str
    lease_id: str | None = None
    available: dict[str, int] | None = None


# --- client <-> broker ---------------------------------------------------------------------


class LeaseRequest(_Message):
    cores: int = Field(1, ge=1, le=4096)
    memory: Annotated[Bytes, Field(gt=0)] = 512 * 1024**2
    duration: Seconds = 300.0


class RenewRequest(_Message):
    duration: Seconds = 300.0


class LeaseGrant(_Message):
    """A granted lease: talk to ``address`` with ``token`` until ``expires_at``."""

    lease_id: str
    node: str
    address: str
    cpu_ids: list[int]
    memory_bytes: int
    granted_at: float
    expires_at: float
    token: str
    max_payload_bytes: int


class LeaseInfo(_Message):
    lease_id: str
    node: str
    address: str
    cpu_ids: list[int]
    memory_bytes: int
    granted_at: float
    expires_at: float


class NodeInfo(_Message):
    node: str
    url: str
    alive: bool
    cpu_ids: list[int]
    memory_bytes: int
    free_cpu_ids: list[int]
    free_memory_bytes: int
    reported_at: float


class BrokerStatus(_Message):
    placement: str
    now: float
    nodes: list[NodeInfo]
    leases: list[LeaseInfo]


class Released(_Message):
    lease_id: str
    released: bool


# --- agent <-> broker ----------------------------------------------------------------------


class ReportedLease(_Message):
    lease_id: str = Field(min_length=1, max_length=128)
    cpu_ids: CpuIds
    memory_bytes: int = Field(ge=0)
    granted_at: float
    expires_at: float
    address: str = Field(max_length=512)
    generation: int = Field(ge=0)


class NodeReport(_Message):
    """An agent's periodic report: its control URL, current offer and live leases."""

    url: str = Field(min_length=1, max_length=512)
    cpu_ids: CpuIds
    memory_bytes: int = Field(ge=0)
    generation: int = Field(ge=0, description="the agent's change counter when it built this report")
    instance: str = Field("", max_length=64, description="random per agent run: a new value means the agent restarted")
    leases: list[ReportedLease] = Field(default_factory=list, max_length=4096)


class ReportReply(_Message):
    node: str
    learned: list[str]
    dropped: list[str]
    release: list[str] = Field(description="leases the broker released: the agent should stop them")


class StartRequest(_Message):
    lease_id: str = Field(min_length=1, max_length=128)
    cpu_ids: CpuIds
    memory_bytes: int = Field(ge=0)
    granted_at: float
    expires_at: float


class StartReply(_Message):
    lease_id: str
    address: str
    pids: list[int]
    generation: int
    max_payload_bytes: int


class ExpiryRequest(_Message):
    expires_at: float


class RevokeRequest(_Message):
    grace_s: float | None = Field(None, ge=0, le=3600, description="default: the agent's eviction_grace_s")
    reason: str = Field("revoked", max_length=64)


class Revoked(_Message):
    lease_id: str
    reason: str
    seconds: float = Field(description="revoke to executor gone, seconds")


class AgentStatus(_Message):
    node: str
    broker_url: str
    cpu_ids: list[int]
    memory_bytes: int
    generation: int
    leases: list[ReportedLease]
