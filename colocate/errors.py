"""One exception tree for colocate, grouped by what the caller can do next.

::

    ColocateError                  every error colocate raises on purpose
    ├── ConfigError                fix the config file or the option (path, key)
    ├── TraceFormatError           fix or skip the input trace (path, line, field)
    ├── BackendUnavailable         a service is down: retry later (Slurm, broker, agent)
    │   └── SlurmUnavailable
    ├── BadRequest                 the request itself is wrong: change it, do not retry
    │   ├── Unauthorized           no, forged or expired credentials or lease token (401)
    │   ├── Forbidden              authenticated, but not allowed: not your lease (403)
    │   └── PayloadTooLarge
    └── LeaseError                 about a lease (lease_id)
        ├── LeaseDenied            no capacity now; carries what was available
        │   └── QuotaExceeded      a user or account limit; names the limit and the use (429)
        ├── LeaseEvicted           the node took the resources back
        ├── LeaseExpired           the lease ran past its expiry
        └── ExecutorLost           the executor vanished (crash, node down)

Messages are one line and say what to do; the fields are there for programs.
"""

from __future__ import annotations


class ColocateError(Exception):
    """Root of every error colocate raises on purpose."""


class ConfigError(ColocateError):
    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        where = ":".join(p for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class TraceFormatError(ColocateError):
    """A trace line or file that cannot be read; names file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int | None = None,
        field: str | None = None,
        expected_format: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.expected_format = expected_format
        where = path if line is None else f"{path}:{line}"
        if field:
            where += f": field {field}"
        super().__init__(f"{where}: {message}")


class BackendUnavailable(ColocateError):
    """A service colocate depends on did not answer; retrying later may work."""


class SlurmUnavailable(BackendUnavailable):
    pass


class BadRequest(ColocateError):
    """The request is malformed or not allowed; retrying it unchanged will not help."""


class Unauthorized(BadRequest):
    pass


class Forbidden(BadRequest):
    """The caller is known but may not do this (another user's lease, an account not theirs)."""


class PayloadTooLarge(BadRequest):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")


class LeaseError(ColocateError):
    def __init__(self, message: str, *, lease_id: str | None = None) -> None:
        self.lease_id = lease_id
        super().__init__(f"lease {lease_id}: {message}" if lease_id else message)


class LeaseDenied(LeaseError):
    """No node can grant the lease now; ``available`` says what the best node had."""

    def __init__(self, message: str, *, available: dict[str, int] | None = None) -> None:
        self.available = available or {}
        super().__init__(message)


class LeaseEvicted(LeaseError):
    pass


class LeaseExpired(LeaseError):
    pass


class ExecutorLost(LeaseError):
    pass


class QuotaExceeded(LeaseDenied):
    """A user or account limit: ``limit`` names it, ``used``/``wanted``/``allowed`` the figures."""

    def __init__(
        self,
        message: str,
        *,
        limit: str = "",
        used: float = 0,
        wanted: float = 0,
        allowed: float = 0,
    ) -> None:
        self.limit = limit
        self.used = used
        self.wanted = wanted
        self.allowed = allowed
        super().__init__(message)
