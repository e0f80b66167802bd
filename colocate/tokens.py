"""Signed lease tokens: only a lease holder can invoke on an executor.

A token is ``base64url(claims JSON) + "." + base64url(HMAC-SHA256(secret, claims))``; the
claims are lease id, node, core ids, memory bytes, expiry (epoch seconds) and the owner's user
name. Standard library only: executors verify tokens on connect, the broker signs them.

:func:`lease_key` is the per-lease key the grant hands to the client and the executor's token
verifier derives too: the executor proves it is the one the broker placed by answering the
client's HELLO nonce with :func:`hello_proof`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from colocate.errors import LeaseExpired, Unauthorized


@dataclass(frozen=True, slots=True)
class LeaseClaims:
    lease_id: str
    node: str
    cpu_ids: tuple[int, ...]
    memory_bytes: int
    expires_at: float
    user: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_lease(secret: bytes, claims: LeaseClaims) -> str:
    body = json.dumps(
        [
            claims.lease_id,
            claims.node,
            list(claims.cpu_ids),
            claims.memory_bytes,
            claims.expires_at,
            claims.user,
        ],
        separators=(",", ":"),
    ).encode()
    mac = hmac.new(secret, body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(mac)}"


def verify_lease(secret: bytes, token: str, now: float) -> LeaseClaims:
    """The token's claims, or Unauthorized (forged, malformed) / LeaseExpired (past expiry)."""
    try:
        body_text, mac_text = token.split(".", 1)
        body = _unb64(body_text)
        mac = _unb64(mac_text)
    except (ValueError, UnicodeError):
        raise Unauthorized("malformed lease token") from None
    if not hmac.compare_digest(mac, hmac.new(secret, body, hashlib.sha256).digest()):
        raise Unauthorized("lease token signature does not match; ask the broker for a new lease")
    try:
        lease_id, node, cpu_ids, memory_bytes, expires_at, *rest = json.loads(body)
        user = str(rest[0]) if rest else ""
        claims = LeaseClaims(
            str(lease_id),
            str(node),
            tuple(int(c) for c in cpu_ids),
            int(memory_bytes),
            float(expires_at),
            user,
        )
    except (ValueError, TypeError):
        raise Unauthorized("malformed lease token claims") from None
    if claims.expires_at <= now:
        raise LeaseExpired("token expired; renew the lease", lease_id=claims.lease_id)
    return claims


def lease_key(secret: bytes, lease_id: str) -> bytes:
    """The per-lease proof key: known to the broker, the node's token verifier and the lease's
    owner (through the grant), never to the worker running user code."""
    return hmac.new(secret, b"colocate lease key v1 " + lease_id.encode(), hashlib.sha256).digest()


def hello_proof(key: bytes, nonce: bytes) -> str:
    """What the executor answers to a client's HELLO ``nonce`` (hex HMAC-SHA256)."""
    return hmac.new(key, b"colocate hello v1 " + nonce, hashlib.sha256).hexdigest()
