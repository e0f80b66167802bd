"""From an error reply back to the colocate exception it names (the caller's side of
:mod:`colocate.broker.service`).

Pure (the error tree only, no FastAPI): the client imports it, and a client must not load
the broker's web stack.
"""

from __future__ import annotations

from typing import Any, Protocol

from colocate import errors
from colocate.errors import (
    BackendUnavailable,
    BadRequest,
    ColocateError,
    ConfigError,
    LeaseDenied,
    LeaseError,
    QuotaExceeded,
)


class Reply(Protocol):
    """What :func:`checked_body` reads of an HTTP reply (an ``httpx.Response``)."""

    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


def checked_body(reply: Reply, where: str) -> Any:
    """The reply's JSON body (None when it is not JSON), once :func:`raise_for_reply` has
    raised the exception an error reply names."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    raise_for_reply(reply.status_code, body, where)
    return body


def raise_for_reply(status: int, body: Any, where: str) -> None:
    """Raise the colocate exception an error reply names (nothing for 2xx).

    ``where`` names the service in the message when the body is not an ErrorReply.
    """
    if status < 400:
        return
    name = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        message = f"{where} answered HTTP {status}"
    lease_id = body.get("lease_id") if isinstance(body, dict) else None
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, ColocateError):
        # Messages already carry "lease X:"; keep the id as a field without repeating it.
        if cls is QuotaExceeded and isinstance(body, dict):
            raise QuotaExceeded(
                message,
                limit=str(body.get("limit") or ""),
                used=_number(body.get("used")),
                allowed=_number(body.get("allowed")),
            )
        if cls is LeaseDenied:
            available = body.get("available") if isinstance(body, dict) else None
            raise LeaseDenied(message, available=available if isinstance(available, dict) else None)
        if issubclass(cls, LeaseError):
            exc = cls(message)
            exc.lease_id = lease_id if isinstance(lease_id, str) else None
            raise exc
        if cls is errors.PayloadTooLarge or cls is errors.TraceFormatError:
            raise BadRequest(message)
        if cls is ConfigError:
            raise BadRequest(message)
        raise cls(message)
    if status >= 500:
        raise BackendUnavailable(f"{where}: {message}")
    raise BadRequest(f"{where}: {message}")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
