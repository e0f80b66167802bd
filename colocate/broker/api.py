"""The broker's and the node agents' HTTP/JSON messages (pydantic, unknown keys refused).

Shared by the broker, the agent and the client so the three cannot drift apart; FastAPI turns
them into the OpenAPI description at ``/openapi.json``. Units: bytes, seconds (epoch for
instants), cores; core ids are kernel CPU numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from colocate.errors import ConfigError
from colocate.lease_value import LeaseValue
from colocate.owner import Owner
from colocate.units import parse_duration, parse_size

API_PREFIX = "/v1"
CONTROL_HEADER = "X-Colocate-Control"  # HMAC of the cluster secret: agents <-> broker only
LEASE_ID_PATTERN = r"^[A-Za-z0-9_.\-]+$"  # what executors accept in file and socket names
Account = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9_.\-]*$")]


def _text_via(parse: Callable[[str], Any], kind: str) -> Callable[[Any], Any]:
    """A pydantic before-validator reading strings with ``parse`` (a units parser); booleans
    are refused (JSON ``true`` is not a size or a duration)."""

    def validate(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"a {kind} cannot be true or false")
        if isinstance(value, str):
            if len(value) > 64:
                raise ValueError(f"a {kind} is at most 64 characters")
            try:
                return parse(value)
            except (ConfigError, OverflowError, ValueError) as exc:
                raise ValueError(str(exc)) from None
        return value

    return validate


_size = _text_via(parse_size, "size")
_duration = _text_via(parse_duration, "duration")


def _whole(value: Any) -> Any:
    """JSON numbers for counts: booleans and strings refused (pydantic would read "1" and true)."""
    if isinstance(value, bool | str):
        raise ValueError("write a whole number, not text or true/false")
    return value


Int = Annotated[int, BeforeValidator(_whole)]
MAX_BYTES = 2**50  # 1 PiB: more is a typo; exact as a JSON/float number, far from int64 overflow
MAX_SECONDS = 10 * 365 * 86400.0

# The string forms the API accepts, as patterns the OpenAPI description can state exactly: at
# most 4 leading digits, so every string that matches is within the numeric bounds.
SIZE_PATTERN = r"^[1-9][0-9]{0,3}(\.[0-9]{1,3})?([KMG]i?B|[KMG])$"
DURATION_PATTERN = r"^[1-9][0-9]{0,3}(\.[0-9]{1,3})?(s|m|h)$"

Bytes = Annotated[
    Int,
    BeforeValidator(_size),
    Field(gt=0, le=MAX_BYTES),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_BYTES},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "description": 'bytes, or a size like "512MiB" (K/M/G binary, KB/MB/GB decimal; "2TiB" works too)',
        }
    ),
]
Seconds = Annotated[
    float,
    BeforeValidator(_duration),
    Field(ge=1.0, le=MAX_SECONDS, allow_inf_nan=False),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 1, "maximum": MAX_SECONDS},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": 'seconds (at least 1), or a duration like "5m"; at most the broker\'s max_lease_s',
        }
    ),
]
# Constraints before the validator: after it, pydantic writes them as non-standard "ge"/"le" keys.
CpuIds = Annotated[
    list[Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(_whole)]], Field(max_length=4096)
]


def _distinct(ids: list[int]) -> list[int]:
    if len(set(ids)) != len(ids):
        raise ValueError("core ids must be distinct")
    return ids


LeaseCpuIds = Annotated[
    list[Annotated[int, Field(ge=0, le=1_000_000), BeforeValidator(_whole)]],
    Field(min_length=1, max_length=4096, json_schema_extra={"uniqueItems": True}),
    AfterValidator(_distinct),
]
Epoch = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False), BeforeValidator(_whole)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ErrorReply(_Message):
    """Every 4xx/5xx body: ``error`` names the colocate exception class, ``message`` says what to do."""

    error: str
    message: str
    lease_id: str | None = None
    available: dict[str, int] | None = None
    limit: str | None = Field(
        None,
        description="QuotaExceeded: the limit (cores, memory, leases, duration_s, core_hours_per_day)",
    )
    used: float | None = None
    allowed: float | None = None


# --- client <-> broker ---------------------------------------------------------------------


class LeaseRequest(_Message):
    cores: Int = Field(1, ge=1, le=4096)
    memory: Bytes = 512 * 1024**2
    duration: Seconds = 300.0
    account: Account = Field("", description="Slurm account to charge; empty: the user's default")


class RenewRequest(_Message):
    duration: Seconds = 300.0


class LeaseInfo(_Message):
    """A lease as the broker shows it to its owner (``/v1/leases``, ``/v1/status``)."""

    lease_id: str
    node: str
    address: str
    cpu_ids: list[int]
    memory_bytes: int
    granted_at: float
    expires_at: float
    user: str = ""
    account: str = ""


class LeaseGrant(LeaseInfo):
    """A granted lease: talk to ``address`` with ``token`` until ``expires_at``; the executor
    proves it is the one placed by answering the client's nonce with HMAC(``lease_key``).
    The lease as :class:`LeaseInfo` describes it, plus what only its holder gets."""

    token: str
    max_payload_bytes: int
    lease_key: str = Field(
        "", description="hex; the executor's proof key (empty: the executor cannot prove itself)"
    )


class OtherLease(_Message):
    """Another user's lease in ``/v1/status``: where and how much, never its id or address."""

    node: str
    cores: int
    memory_bytes: int
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
    leases: list[LeaseInfo] = Field(description="the caller's leases (every lease for an admin)")
    others: list[OtherLease] = Field(
        default_factory=list, description="other users' leases, without ids"
    )


class LeaseList(_Message):
    leases: list[LeaseInfo]


class UsageRecord(_Message):
    lease_id: str
    user: str
    uid: int
    account: str
    node: str
    cores: int
    memory_bytes: int
    start: float
    expires_at: float
    last_seen: float
    end: float | None
    end_reason: str | None
    core_seconds: float
    gib_seconds: float
    money: float


class UsageReport(_Message):
    """Ledger rows that ran since ``since``; open leases count to when they were last seen."""

    since: float | None
    currency: str
    records: list[UsageRecord]


class Released(_Message):
    lease_id: str
    released: bool


# --- agent <-> broker ----------------------------------------------------------------------


class ReportedLease(_Message):
    """A lease an agent runs, as it reports it (its executor's ``address``; ``generation``:
    the agent's change counter when the executor started); the agent builds it with :meth:`of`."""

    lease_id: str = Field(min_length=1, max_length=128, pattern=LEASE_ID_PATTERN)
    cpu_ids: CpuIds
    memory_bytes: Int = Field(ge=0, le=MAX_BYTES)
    granted_at: Epoch
    expires_at: Epoch
    address: str = Field(max_length=512)
    generation: Int = Field(ge=0, le=2**53)

    @classmethod
    def of(cls, lease: LeaseValue, address: str, generation: int) -> ReportedLease:
        """The edge from the agent's side: its :class:`~colocate.lease_value.LeaseValue`."""
        return cls(
            lease_id=lease.lease_id,
            cpu_ids=list(lease.cpu_ids),
            memory_bytes=lease.memory_bytes,
            granted_at=lease.granted_at,
            expires_at=lease.expires_at,
            address=address,
            generation=generation,
        )


class NodeReport(_Message):
    """An agent's periodic report: its control URL, current offer and live leases."""

    url: str = Field(min_length=1, max_length=512, pattern=r"^https?://")
    cpu_ids: CpuIds
    memory_bytes: Int = Field(ge=0, le=MAX_BYTES)
    generation: Int = Field(
        ge=0, le=2**53, description="the agent's change counter when it built this report"
    )
    instance: str = Field(
        "", max_length=64, description="random per agent run: a new value means the agent restarted"
    )
    leases: list[ReportedLease] = Field(default_factory=list, max_length=4096)


class ReportReply(_Message):
    node: str
    learned: list[str]
    dropped: list[str]
    release: list[str] = Field(description="leases the broker released: the agent should stop them")


class NodeHeartbeat(_Message):
    """An agent whose offer and leases did not change since its last report: still alive."""

    instance: str = Field("", max_length=64, description="as in the agent's last NodeReport")
    generation: Int = Field(ge=0, le=2**53, description="as in the agent's last NodeReport")


class HeartbeatReply(_Message):
    known: bool = Field(
        description="false: the broker needs the full report now (it restarted, or has news)"
    )


class LeaseOwner(_Message):
    """Who a lease runs for (see :class:`colocate.owner.Owner`)."""

    uid: Int = Field(ge=0, le=2**32 - 1)
    gid: Int = Field(ge=0, le=2**32 - 1)
    user: str = Field(min_length=1, max_length=64)
    account: Account = ""

    @classmethod
    def of(cls, owner: Owner) -> LeaseOwner:
        return cls(uid=owner.uid, gid=owner.gid, user=owner.user, account=owner.account)


class PlacedLease(Protocol):
    """What the broker knows of a lease it placed (``policies.leasebook.LeaseRecord``)."""

    @property
    def lease_id(self) -> str: ...
    @property
    def cpu_ids(self) -> Sequence[int]: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def granted_at(self) -> float: ...
    @property
    def expires_at(self) -> float: ...


class StartRequest(_Message):
    """The broker placed a lease on this agent's node: start its executor."""

    lease_id: str = Field(min_length=1, max_length=128, pattern=LEASE_ID_PATTERN)
    cpu_ids: LeaseCpuIds
    memory_bytes: Int = Field(ge=0, le=MAX_BYTES)
    granted_at: Epoch
    expires_at: Epoch
    owner: LeaseOwner | None = None

    @classmethod
    def placing(cls, record: PlacedLease, owner: Owner | None) -> StartRequest:
        """The broker's edge: the request for a lease it placed (its ledger record and the
        owner it runs for); :meth:`lease` is the other end, on the agent."""
        return cls(
            lease_id=record.lease_id,
            cpu_ids=list(record.cpu_ids),
            memory_bytes=record.memory_bytes,
            granted_at=record.granted_at,
            expires_at=record.expires_at,
            owner=None if owner is None else LeaseOwner.of(owner),
        )

    def lease(self) -> LeaseValue:
        """The edge to the agent's side: the lease as a :class:`~colocate.lease_value.LeaseValue`."""
        o = self.owner
        return LeaseValue.of(
            self.lease_id,
            self.cpu_ids,
            self.memory_bytes,
            self.granted_at,
            self.expires_at,
            None if o is None else Owner(o.uid, o.gid, o.user, o.account),
        )


class StartReply(_Message):
    lease_id: str
    address: str
    pids: list[int]
    generation: int
    max_payload_bytes: int


class ExpiryRequest(_Message):
    expires_at: Epoch


class RevokeRequest(_Message):
    grace_s: float | None = Field(
        None,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="default: the agent's eviction_grace_s",
    )
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
