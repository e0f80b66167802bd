"""Agents and the broker authenticate per node, with signed, timestamped requests.

Each node has its own key, ``node_key(cluster secret, node)``: the broker derives every node's
key, an agent only needs its own (give it the cluster secret, or only its key file from
``colocate broker --node-key NODE``) (it signs its reports with it, its executors check lease
tokens with it, and the broker signs that node's lease tokens with it). A request carries::

    X-Colocate-Node: n1
    X-Colocate-Time: 1796424961.123        (epoch seconds)
    X-Colocate-Nonce: 32 hex digits
    X-Colocate-Signature: hex HMAC-SHA256(node key, METHOD \\n PATH \\n TIME \\n NONCE \\n sha256(body))

The receiver refuses a signature of another node's key (a stolen key of n1 cannot speak for
n2), a time more than ``window_s`` away from its clock, and a nonce it has already seen
within the window (an old request cannot be replayed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping

import httpx

from colocate.errors import Unauthorized

NODE_HEADER = "X-Colocate-Node"
TIME_HEADER = "X-Colocate-Time"
NONCE_HEADER = "X-Colocate-Nonce"
SIGNATURE_HEADER = "X-Colocate-Signature"
WINDOW_S = 30.0


def node_key(secret: bytes, node: str) -> bytes:
    """The key of ``node``, derived from the cluster secret (hex text, like the secret file).

    ``secret`` may instead be that node's key file alone (``node NAME KEY``, as
    ``colocate broker --node-key NAME`` prints it): a site that installs only those on its
    compute nodes keeps the cluster secret off them. Another node's key file gives a key the
    broker refuses."""
    prefix = b"node " + node.encode() + b" "
    if secret.startswith(prefix):
        return secret[len(prefix) :].strip()
    return (
        hmac.new(secret, b"colocate node key v1 " + node.encode(), hashlib.sha256)
        .hexdigest()
        .encode()
    )


def node_key_file(secret: bytes, node: str) -> str:
    """The text of ``node``'s key file (install it as the agent's secret file, root, 0600)."""
    return f"node {node} {node_key(secret, node).decode()}\n"


def _signature(key: bytes, method: str, path: str, stamp: str, nonce: str, body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest()
    text = f"{method.upper()}\n{path}\n{stamp}\n{nonce}\n{digest}".encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def sign(
    key: bytes, node: str, method: str, path: str, body: bytes = b"", now: float | None = None
) -> dict[str, str]:
    """The headers that authenticate one request of (or to) ``node``."""
    stamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    return {
        NODE_HEADER: node,
        TIME_HEADER: stamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: _signature(key, method, path, stamp, nonce, body),
    }


class NodeAuth(httpx.Auth):
    """Signs every request with ``node``'s key (``key_for(node)``: one key, or the broker's
    derivation for the node a request goes to)."""

    requires_request_body = True

    def __init__(self, key: bytes, node: str) -> None:
        self._key = key
        self._node = node

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(
            sign(self._key, self._node, request.method, request.url.path, request.content)
        )
        yield request


class NodeVerifier:
    """Checks signed requests. ``key_for(node)`` gives a node's key (KeyError: unknown)."""

    def __init__(
        self,
        key_for: Callable[[str], bytes],
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_for = key_for
        self._window = window_s
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten
        self._lock = threading.Lock()

    def verify(
        self,
        headers: Mapping[str, str],
        method: str,
        path: str,
        body: bytes,
        node: str | None = None,
    ) -> str:
        """The authenticated node name, or Unauthorized. ``node``: the only node allowed."""
        name = headers.get(NODE_HEADER)
        stamp = headers.get(TIME_HEADER)
        nonce = headers.get(NONCE_HEADER)
        given = headers.get(SIGNATURE_HEADER)
        if not (name and stamp and nonce and given) or not all(
            v.isascii() for v in (name, stamp, nonce, given)
        ):
            raise Unauthorized(
                f"{method} {path}: not signed by a node agent; agent and broker must share broker.secret_file"
            )
        if node is not None and name != node:
            raise Unauthorized(
                f"{method} {path}: signed by node {name}, not by {node}; a node speaks only for itself"
            )
        try:
            key = self._key_for(name)
            when = float(stamp)
        except (KeyError, ValueError):
            raise Unauthorized(
                f"{method} {path}: unknown node {name!r} or bad time stamp"
            ) from None
        now = self._clock()
        if not abs(now - when) <= self._window:
            raise Unauthorized(
                f"{method} {path}: signed at {when:.0f}, {now - when:+.0f}s from this clock; keep clocks in sync (NTP)"
            )
        if not hmac.compare_digest(given, _signature(key, method, path, stamp, nonce, body)):
            raise Unauthorized(
                f"{method} {path}: signature of node {name} does not match; agent and broker must share broker.secret_file"
            )
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if nonce in self._seen:
                raise Unauthorized(f"{method} {path}: replayed request (nonce already used)")
            self._seen[nonce] = now + 2 * self._window
        return name
