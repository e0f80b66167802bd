"""Group tickets: what lets a sandboxed worker ask its supervisor for FMI sockets.

A rank of an FMI group (``colocate.fmi``) runs inside its lease's sandbox; under
``executor.network = "none"`` it cannot open a socket that reaches another lease or node. Its
supervisor, outside the sandbox, opens them on its behalf (``colocate.executor.fmi_sockets``),
but only with a ticket the lease's owner signed: ``HMAC-SHA256(lease key, ticket)``, where the
lease key is the grant's (:func:`colocate.tokens.lease_key`), known to the owner's client and the
node's supervisor, never to the worker. A ticket names its group, its lease, the host the
lease's listeners bind to, the addresses the rank may connect to (its peers' listeners and the
group's Redis, if any) and an expiry (epoch seconds).

The group key that authenticates every channel between ranks (:func:`group_key`) is derived
from the members' lease keys and the group id by the client, and travels to each rank inside
its (token-authenticated) call.

Standard library only: the supervisor and the client both import it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

from colocate.errors import Unauthorized

_TICKET_DOMAIN = b"colocate fmi ticket v1 "
_GROUP_DOMAIN = b"colocate fmi group v1 "


@dataclass(frozen=True, slots=True)
class GroupTicket:
    group: str
    lease_id: str
    host: str  # where this lease's FMI listeners bind
    expires_at: float  # epoch seconds
    peers: tuple[tuple[str, int], ...] = field(default=())  # addresses a rank may connect to

    def encode(self) -> bytes:
        return json.dumps(
            [self.group, self.lease_id, self.host, self.expires_at, [list(p) for p in self.peers]],
            separators=(",", ":"),
        ).encode()

    @staticmethod
    def decode(data: bytes) -> GroupTicket:
        try:
            group, lease_id, host, expires_at, peers = json.loads(data)
            return GroupTicket(
                str(group),
                str(lease_id),
                str(host),
                float(expires_at),
                tuple((str(h), int(p)) for h, p in peers),
            )
        except (ValueError, TypeError):
            raise Unauthorized("malformed FMI group ticket") from None


def sign_ticket(key: bytes, ticket: GroupTicket) -> str:
    """Hex HMAC of the ticket under the lease key ``key``."""
    return hmac.new(key, _TICKET_DOMAIN + ticket.encode(), hashlib.sha256).hexdigest()


def check_ticket(key: bytes, data: bytes, signature: str, now: float) -> GroupTicket:
    """The ticket ``data`` if ``signature`` is its HMAC under ``key`` and it has not expired;
    Unauthorized otherwise."""
    expected = hmac.new(key, _TICKET_DOMAIN + data, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise Unauthorized("FMI group ticket signature does not match the lease key")
    ticket = GroupTicket.decode(data)
    if ticket.expires_at <= now:
        raise Unauthorized(f"FMI group ticket of group {ticket.group} expired")
    return ticket


def group_key(lease_keys: list[bytes], group: str) -> bytes:
    """The key every channel of ``group`` is authenticated with (32 bytes): HMAC over the
    members' lease keys, in rank order, and the group id."""
    mac = hmac.new(b"".join(lease_keys), _GROUP_DOMAIN + group.encode(), hashlib.sha256)
    return mac.digest()
