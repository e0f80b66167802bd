"""The client side of leases: ask the broker, hold the lease, get an executor on it.

::

    with Client("http://127.0.0.1:8642").lease(cores=1, memory="512MiB", duration="5m") as lease:
        ex = lease.executor()
        ex.invoke(fn, b"x" * 64)

Errors a caller can act on: LeaseDenied (no capacity now; ``available`` says what the best
node had), LeaseExpired, LeaseEvicted, and BackendUnavailable naming the broker URL.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from colocate.auth.identity import ClientAuth
from colocate.broker.api import (
    API_PREFIX,
    BrokerStatus,
    LeaseGrant,
    LeaseInfo,
    LeaseList,
    LeaseRequest,
    Released,
    RenewRequest,
    UsageReport,
)
from colocate.broker.replies import checked_body
from colocate.errors import BackendUnavailable, ConfigError, LeaseError, LeaseExpired
from colocate.units import parse_duration, parse_size

if TYPE_CHECKING:
    from colocate.client.executor import LeaseExecutor
    from colocate.process import Process

log = logging.getLogger(__name__)

DEFAULT_BROKER = "http://127.0.0.1:8642"
#: Automatic retries of one call (after the first attempt) on a broker that could not be
#: reached or answered 503 with Retry-After (load shedding): bounded and jittered.
RETRIES = 3
RETRY_BASE_S = 0.1  # first back-off on the same broker; doubles each time
RETRY_MAX_S = 5.0  # no single wait is longer (a larger Retry-After is cut to this)


def broker_urls(broker_url: str | Sequence[str]) -> list[str]:
    """The broker URLs ``broker_url`` names: one URL, several separated by commas, or a list."""
    items = broker_url.split(",") if isinstance(broker_url, str) else list(broker_url)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    if not urls:
        raise ConfigError("no broker URL given; pass one like http://127.0.0.1:8642")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"broker URL {url!r} must start with http:// or https://")
    return list(dict.fromkeys(urls))


def _retry_after(reply: httpx.Response) -> float | None:
    """Seconds a 503 asks to wait (None: not a load-shedding answer, do not retry)."""
    if reply.status_code != 503:
        return None
    value = reply.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


class Client:
    """A connection to the lease broker(s) at ``broker_url``.

    ``broker_url`` is one URL, several separated by commas, or a list: brokers serving the same
    cluster. A call goes to the current broker; when that one cannot be reached the client
    fails over to the next by itself, and when a broker sheds load (503 with Retry-After) it
    waits that long (jittered) and tries again -- at most ``retries`` times per call. Lease
    requests carry an idempotency key, so a retried request is never granted twice.

    Every call carries the caller's identity: a fresh MUNGE credential from the local munged,
    or the Slurm JWT in ``jwt`` (default ``$SLURM_JWT``, as ``scontrol token`` prints it).
    ``timeout_s`` bounds every broker call (seconds). Thread-safe; close it (or use it as a
    context manager) to free its connections. ``retried`` counts the automatic retries.
    """

    def __init__(
        self,
        broker_url: str | Sequence[str] = DEFAULT_BROKER,
        *,
        timeout_s: float = 10.0,
        jwt: str | None = None,
        retries: int = RETRIES,
    ) -> None:
        self.broker_urls = broker_urls(broker_url)
        self._current = 0
        self.retries = max(0, retries)
        self.retried = 0
        self._http = httpx.Client(timeout=timeout_s, auth=ClientAuth(jwt))

    @property
    def broker_url(self) -> str:
        """The broker calls go to now."""
        return self.broker_urls[self._current]

    def _failover(self, failed: str) -> bool:
        """``failed`` could not be reached: move to the next broker (False when there is only one)."""
        if len(self.broker_urls) == 1:
            return False
        if self.broker_url == failed:
            self._current = (self._current + 1) % len(self.broker_urls)
            log.warning("broker %s did not answer; failing over to %s", failed, self.broker_url)
        return True

    def _call(
        self,
        method: str,
        path: str,
        body: Any | None = None,
        params: dict[str, str] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Any:
        """One API call, retried on an unreachable broker (next broker first) or a 503 with
        Retry-After; the last failure is raised as BackendUnavailable naming every broker."""
        attempt = 0
        while True:
            url = self.broker_url
            headers: dict[str, str] = {}
            if idempotency_key is not None:
                headers["Idempotency-Key"] = idempotency_key
                headers["Idempotency-Retry"] = str(attempt)
            try:
                reply = self._http.request(
                    method, f"{url}{API_PREFIX}{path}", json=body, params=params, headers=headers
                )
            except httpx.HTTPError as exc:
                switched = self._failover(url)
                if attempt >= self.retries:
                    where = ", ".join(self.broker_urls)
                    raise BackendUnavailable(
                        f"broker {where} did not answer ({type(exc).__name__}); "
                        "start it with `colocate broker` or pass the right URL"
                    ) from None
                # another broker: go now (a little jitter); the same one: back off
                wait = random.uniform(0, 0.05) if switched else self._backoff(attempt)
            else:
                shed = _retry_after(reply)
                if shed is None or attempt >= self.retries:
                    return checked_body(reply, f"broker {url}")
                wait = min(RETRY_MAX_S, shed) * random.uniform(1.0, 1.5) or self._backoff(attempt)
            attempt += 1
            self.retried += 1
            log.info("%s %s: retry %d in %.2fs", method, path, attempt, wait)
            time.sleep(wait)

    @staticmethod
    def _backoff(attempt: int) -> float:
        return float(min(RETRY_MAX_S, RETRY_BASE_S * 2**attempt) * random.uniform(0.5, 1.5))

    def lease(
        self,
        cores: int = 1,
        memory: str | int = "512MiB",
        duration: str | float = "5m",
        *,
        account: str = "",
    ) -> Lease:
        """Ask for ``cores`` cores and ``memory`` (bytes or "512MiB") for ``duration``
        (seconds or "5m"), charged to Slurm ``account`` (default: yours). The lease is granted
        now; use it as a context manager to release it.

        Raises LeaseDenied when no node has that much free, QuotaExceeded past a user or
        account limit, Unauthorized without credentials, Forbidden for an account not yours,
        BackendUnavailable when the broker cannot be reached, ConfigError for an unreadable
        size or duration.
        """
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ConfigError(f"cores={cores!r}: ask for a whole number of cores, at least 1")
        try:
            request = LeaseRequest(
                cores=cores,
                memory=parse_size(memory),
                duration=parse_duration(duration),
                account=account,
            )
        except ValidationError as exc:
            raise ConfigError(f"lease request: {_first_error(exc)}") from None
        key = secrets.token_hex(16)  # the same on every retry: one grant at most
        grant = LeaseGrant.model_validate(
            self._call("POST", "/leases", request.model_dump(), idempotency_key=key)
        )
        return Lease(self, grant)

    def process(
        self,
        name: str,
        *,
        cores: int = 1,
        memory: str | int = "512MiB",
        duration: str | float = "10m",
        store: str | None = None,
        workers: int = 1,
    ) -> Process:
        """The serverless process ``name`` of the caller (live or swapped out): state kept
        across invocations and leases; see :class:`colocate.process.Process`."""
        from colocate.process import Process

        return Process(
            self,
            name,
            cores=cores,
            memory=memory,
            duration=duration,
            store=store,
            workers=workers,
        )

    def status(self) -> BrokerStatus:
        """The broker's nodes, their offers and free capacity; your leases in full (every
        lease for an admin), other users' in ``others`` without ids."""
        return BrokerStatus.model_validate(self._call("GET", "/status"))

    def leases(self, node: str | None = None) -> list[LeaseInfo]:
        """Your live leases (every lease for an admin), optionally only those on ``node``."""
        params = {"node": node} if node else None
        return LeaseList.model_validate(self._call("GET", "/leases", params=params)).leases

    def release(self, lease_id: str) -> bool:
        """Give back a lease by id (yours, or any for an admin): True if it was live, False
        if it had been released already. Raises Forbidden for another user's lease,
        LeaseExpired / LeaseEvicted / LeaseError when it ended otherwise or is unknown."""
        return Released.model_validate(self._call("DELETE", f"/leases/{lease_id}")).released

    def renew(self, lease_id: str, duration: str | float = "5m") -> LeaseGrant:
        """Extend a lease by id to now + ``duration``; the grant carries the new token (the
        executor refuses the old one)."""
        try:
            request = RenewRequest(duration=parse_duration(duration))
        except ValidationError as exc:
            raise ConfigError(f"renew of {lease_id}: {_first_error(exc)}") from None
        return LeaseGrant.model_validate(
            self._call("POST", f"/leases/{lease_id}/renew", request.model_dump())
        )

    def usage(
        self, *, user: str | None = None, account: str | None = None, since: str | None = None
    ) -> UsageReport:
        """Ledger records since ``since`` (ISO date/time, UTC): yours, or anyone's for an admin."""
        params = {k: v for k, v in (("user", user), ("account", account), ("since", since)) if v}
        return UsageReport.model_validate(self._call("GET", "/usage", params=params or None))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({','.join(self.broker_urls)!r})"


class Lease:
    """Cores and memory on one node, held until :meth:`release` or ``expires_at``.

    Fields of the grant: ``lease_id``, ``node``, ``address`` (the executor), ``cpu_ids``,
    ``memory_bytes``, ``expires_at`` (epoch seconds), ``token`` (proves the lease to the
    executor).
    """

    def __init__(self, client: Client, grant: LeaseGrant) -> None:
        self._client = client
        self._grant = grant
        self._executors: list[LeaseExecutor] = []
        self._released = False
        self._lock = threading.Lock()

    # the grant, as attributes
    @property
    def lease_id(self) -> str:
        return self._grant.lease_id

    @property
    def node(self) -> str:
        return self._grant.node

    @property
    def address(self) -> str:
        return self._grant.address

    @property
    def cpu_ids(self) -> tuple[int, ...]:
        return tuple(self._grant.cpu_ids)

    @property
    def cores(self) -> int:
        return len(self._grant.cpu_ids)

    @property
    def memory_bytes(self) -> int:
        return self._grant.memory_bytes

    @property
    def expires_at(self) -> float:
        return self._grant.expires_at

    @property
    def token(self) -> str:
        return self._grant.token

    @property
    def remaining_s(self) -> float:
        """Seconds until expiry (negative once expired)."""
        return self._grant.expires_at - time.time()

    def executor(
        self,
        functions: Iterable[Callable[..., Any] | str] = (),
        *,
        workers: int | None = None,
        max_payload_bytes: int | None = None,
    ) -> LeaseExecutor:
        """A ``concurrent.futures.Executor`` on this lease's executor (one worker per core by
        default). ``functions`` are shipped once now; others are shipped on first use.

        Raises LeaseExpired if the lease has ended.
        """
        if self._released:
            raise LeaseExpired("was released; ask for a new lease", lease_id=self.lease_id)
        if self.remaining_s <= 0:
            raise LeaseExpired("has expired; ask for a new lease", lease_id=self.lease_id)
        from colocate.client.executor import LeaseExecutor

        executor = LeaseExecutor(
            self.address,
            self.token,
            lease_id=self.lease_id,
            workers=workers or self.cores,
            max_payload_bytes=max_payload_bytes or self._grant.max_payload_bytes,
            functions=tuple(functions),
            lease_key=self._grant.lease_key,
        )
        with self._lock:
            self._executors.append(executor)
        return executor

    def renew(self, duration: str | float = "5m") -> Lease:
        """Extend the lease to now + ``duration``; executors made afterwards use the new token.

        Raises LeaseExpired / LeaseEvicted if the lease is already over.
        """
        self._grant = self._client.renew(self.lease_id, duration)
        return self

    def release(self) -> None:
        """Shut the executors down and give the cores back; safe to call twice."""
        with self._lock:
            if self._released:
                return
            self._released = True
            executors, self._executors = self._executors, []
        for executor in executors:
            try:
                executor.shutdown(wait=False, cancel_futures=True)
            except Exception:
                log.debug("shutting down an executor of %s failed", self.lease_id, exc_info=True)
        with contextlib.suppress(LeaseError):  # already over: expired or evicted
            self._client._call("DELETE", f"/leases/{self.lease_id}")

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except BackendUnavailable:
            if exc is None:
                raise
            log.warning(
                "could not release %s: broker unreachable; it ends at expiry", self.lease_id
            )

    def __repr__(self) -> str:
        return f"Lease({self.lease_id!r}, node={self.node!r}, cores={self.cores}, expires in {self.remaining_s:.0f}s)"
