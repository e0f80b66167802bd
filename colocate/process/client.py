"""The client side of serverless processes (PraaS): a named process whose state outlives its
leases.

::

    with Client(url).process("counter", memory="1GiB") as proc:
        proc.invoke(lambda state, n: state.__setitem__("n", state.get("n", 0) + n), 1)

``proc.invoke(fn, *args)`` runs ``fn(state, *args)`` in the process's worker; the lease is
taken on first use and again after an eviction, and the state comes back from the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import sysconfig
import time
import types
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from colocate.errors import (
    ConfigError,
    ExecutorLost,
    LeaseError,
    LeaseEvicted,
    LeaseExpired,
    Unauthorized,
)
from colocate.fmi_ticket import GroupTicket, sign_ticket
from colocate.process.runtime import LOCK_WAIT_S, PEER_NOTE, Call, ProcessLiveElsewhere
from colocate.process.store import check_name

if TYPE_CHECKING:
    from colocate.client.executor import LeaseExecutor
    from colocate.client.lease import Client, Lease

DEFAULT_STORE = "/var/lib/colocate/processes"
STORE_ENV = "COLOCATE_PROCESS_STORE"
TICKET_LIFETIME_S = 3600.0  # a message ticket: re-signed when a call finds it this close to expiry
TICKET_RENEW_S = 600.0
MAX_PEERS = 64  # receivers on other nodes a ticket names


def _close(executor: LeaseExecutor) -> None:
    """Close our connection to a lease's workers, quietly: it may be gone already."""
    with contextlib.suppress(Exception):
        executor.shutdown(wait=False, cancel_futures=True)


class StateRolledBack(UserWarning):
    """The process resumed from its last consistent state: its latest updates did not reach
    the store within the eviction's grace period."""


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(str(Path(__file__).resolve().parents[1]))
    return tuple(sorted(roots))


def pickle_function(fn: Callable[..., Any]) -> bytes:
    """cloudpickle of ``fn``, its module by value unless installed on the nodes."""
    import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    file = getattr(module, "__file__", None)
    by_value = (
        module is not None
        and isinstance(fn, types.FunctionType)
        and isinstance(file, str)
        and not os.path.realpath(file).startswith(_installed_roots())
    )
    if not by_value or module is None:
        return bytes(cloudpickle.dumps(fn, protocol=5))
    already = module.__name__ in cloudpickle.list_registry_pickle_by_value()
    if not already:
        cloudpickle.register_pickle_by_value(module)
    try:
        return bytes(cloudpickle.dumps(fn, protocol=5))
    finally:
        if not already:
            cloudpickle.unregister_pickle_by_value(module)


class Process:
    """A named process of the caller: its state (Python objects and a directory of files)
    lives in a leased worker and in ``store`` when no lease holds it.

    ``store`` is a directory every node sees (Lustre, GPFS, NFS), default
    ``$COLOCATE_PROCESS_STORE`` or /var/lib/colocate/processes; the state sits in
    ``<store>/<uid>/<name>``, mode 0700, written by the lease's owner. Or a Redis URL
    (``redis://host:port/db``, see ``colocate.process.redis_store``): same semantics, keys
    under ``colocate:process:<uid>:<name>:``.

    ``name`` is the caller's own process; ``"<user>/<name>"`` names user's, and only that
    user's leases reach it (anyone else gets Forbidden). A second client of the owner that
    asks for a live process attaches to the lease it runs on (its release then leaves that
    lease to the client that took it).

    Keys of ``state`` are transactional; files in ``state.dir`` are not: they go straight to
    the store's directory (``<store>/<uid>/<name>/files``), survive the lease, and stay
    when the call that wrote them raises. Write a file under a temporary name and
    ``os.replace`` it for an all-or-nothing update. With a Redis store ``state.dir`` is a
    local scratch directory that does not follow the process to its next lease.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        cores: int = 1,
        memory: str | int = "512MiB",
        duration: str | float = "10m",
        store: str | None = None,
        workers: int = 1,
    ) -> None:
        check_name(name)
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ConfigError(f"process {name!r}: cores={cores!r}; ask for a whole number >= 1")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"process {name!r}: workers={workers!r}; ask for a whole number >= 1")
        self._cores = max(cores, workers)
        self._workers = workers
        self.name = name
        self.store = store or os.environ.get(STORE_ENV) or DEFAULT_STORE
        if not os.path.isabs(self.store) and not self.store.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"process store {self.store!r}: give an absolute path every node sees, or a "
                "Redis URL (redis://host:port/db)"
            )
        self._client = client
        self._memory = memory
        self._duration = duration
        self._lease: Lease | None = None
        self._executor: LeaseExecutor | None = None
        self._calls: dict[Any, Call] = {}
        self._owns_lease = True
        self._doubt: tuple[Any, tuple[Any, ...], dict[str, Any], str] | None = None
        self.notices: list[str] = []
        self.leases: list[str] = []  # ids of the leases this process ran on, oldest first
        # direct messages across nodes: the addresses of other processes' listeners that our
        # worker asked for (it may connect only where a ticket we signed says)
        self._peers: dict[tuple[str, int], None] = {}  # oldest first, at most MAX_PEERS
        self._ticket: tuple[Any, float, str, str] | None = None  # executor, expiry, ticket, sig

    @property
    def lease(self) -> Lease | None:
        """The lease the process runs on now (None while swapped out)."""
        return self._lease

    def _ensure(self) -> LeaseExecutor:
        if self._executor is None and self._lease is not None:
            # the connection was lost but not the lease: connect to it again (a token that
            # an attacher's renewal replaced is refused at HELLO: Unauthorized, _refresh)
            self._executor = self._lease.executor(workers=self._workers)
        if self._executor is None:
            lease = self._client.lease(self._cores, self._memory, self._duration)
            self._lease, self._owns_lease = lease, True
            self.leases.append(lease.lease_id)
            self._executor = lease.executor(workers=self._workers)
        return self._executor

    def _forget(self) -> None:
        lease, executor = self._lease, self._executor
        self._lease, self._executor = None, None
        if lease is not None and self._owns_lease:
            with contextlib.suppress(Exception):  # already gone: evicted or expired
                lease.release()
        elif executor is not None:  # attached: the lease is the other client's to give back
            _close(executor)

    def _with_ticket(self, executor: LeaseExecutor, call_id: str) -> str | tuple[str, str, str]:
        """``call_id`` with the ticket (signed with the lease key) that lets the worker's
        supervisor open its message listener and its connections to the ``_peers``."""
        if not executor.lease_key:
            return call_id
        held = self._ticket
        now = time.time()
        if held is None or held[0] is not executor or held[1] - now < TICKET_RENEW_S:
            host = urlsplit(executor.lease_address).hostname or "127.0.0.1"
            ticket = GroupTicket(
                f"process:{self.name}",
                executor.lease_id,
                host,
                now + TICKET_LIFETIME_S,
                tuple(sorted(self._peers)),
            )
            sig = sign_ticket(bytes.fromhex(executor.lease_key), ticket)
            held = self._ticket = (executor, ticket.expires_at, ticket.encode().decode(), sig)
        return (call_id, held[2], held[3])

    def _notes(self, notes: list[str]) -> list[str]:
        """The user's notices; the worker's requests for peers go into the next ticket."""
        out = []
        for note in notes:
            if note.startswith(PEER_NOTE):
                for h, p in json.loads(note[len(PEER_NOTE) :]):
                    self._peers.pop((str(h), int(p)), None)
                    self._peers[(str(h), int(p))] = None
                while len(self._peers) > MAX_PEERS:  # a ticket stays small: the latest ones
                    del self._peers[next(iter(self._peers))]
                self._ticket = None
            else:
                out.append(note)
        return out

    def _drop_connection(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            _close(executor)

    def _attach(self, lease_id: str) -> bool:
        """Move to the lease ``lease_id`` where the process is live (ours: the broker refuses
        another user's); False when that lease is over (its worker is still swapping out)."""
        try:
            grant = self._client.renew(lease_id, self._duration)
        except LeaseError:
            return False
        assert self._lease is not None  # the lease we took to find out
        lease_type = type(self._lease)  # (colocate.client.lease.Lease: not imported here)
        self._forget()
        lease = lease_type(self._client, grant)
        self._lease, self._owns_lease = lease, False
        self.leases.append(lease.lease_id)
        self._executor = lease.executor(workers=self._workers)
        return True

    def _refresh(self) -> None:
        """Another client attached and renewed the lease (a new token): renew ours too. A
        lease the broker will not renew any more (over) is forgotten: the next call leases
        again and finds the state in the store."""
        assert self._lease is not None
        old = self._executor
        try:
            self._lease.renew(self._duration)
        except LeaseError:
            self._forget()
            return
        self._executor = self._lease.executor(workers=self._workers)
        if old is not None:
            _close(old)

    def _run(
        self, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any], call_id: str = ""
    ) -> Any:
        for attempt in range(4):
            reconnect = self._executor is None and self._lease is not None
            try:
                try:
                    executor = self._ensure()
                except (ExecutorLost, LeaseEvicted, LeaseExpired, OSError):
                    if not reconnect:
                        raise
                    self._forget()  # the lease is gone too: lease again (nothing was sent)
                    continue
                result, notes = executor.invoke(
                    call, self._with_ticket(executor, call_id), *args, **kwargs
                )
            except ProcessLiveElsewhere as exc:
                if attempt == 3:
                    raise
                if not self._attach(exc.lease_id):  # wait on our lease for the lock instead
                    call = Call(
                        call.root, call.name, call.fn_bytes, call.op, LOCK_WAIT_S, call.shared
                    )
                continue
            except Unauthorized:
                if self._lease is None or attempt == 3:
                    raise
                self._refresh()
                continue
            except ExecutorLost:
                # the connection (or the worker) went away, not necessarily the lease: the
                # next call connects to the lease again, or leases anew if it is over; the
                # lease stays with an attached client, whose process lives on it
                self._drop_connection()
                raise
            except (LeaseEvicted, LeaseExpired):
                self._forget()  # the next call leases again and finds the state in the store
                raise
            for note in self._notes(notes):
                self.notices.append(note)
                warnings.warn(note, StateRolledBack, stacklevel=3)
            return result
        raise AssertionError("unreachable")

    def _retry_of(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The id of the call that failed last with the lease (outcome unknown) if this one
        repeats it: same function, equal arguments."""
        doubt, self._doubt = self._doubt, None
        if doubt is None or doubt[0] is not fn:
            return ""
        import cloudpickle

        try:
            same = cloudpickle.dumps((args, kwargs)) == cloudpickle.dumps(doubt[1:3])
        except Exception:
            return ""
        return doubt[3] if same else ""

    def invoke(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(state, *args, **kwargs)`` in the process; its changes to ``state`` commit when
        it returns (none if it raises or the lease is taken back meanwhile, which raises
        LeaseEvicted here: call again, the process comes back on a new lease).

        Retries are safe: when a call failed with the lease (LeaseEvicted, LeaseExpired,
        ExecutorLost) and the next one has the same function and equal arguments, it carries
        the same call id, so if the first did commit before the lease was lost, the retry
        returns its result instead of applying it twice."""
        call = self._calls.get(fn)
        if call is None:
            call = self._calls[fn] = self._call(pickle_function(fn))
        call_id = self._retry_of(fn, args, kwargs) or uuid.uuid4().hex
        try:
            return self._run(call, args, kwargs, call_id)
        except (LeaseEvicted, LeaseExpired, ExecutorLost):
            self._doubt = (fn, args, kwargs, call_id)
            raise

    def _call(self, fn_bytes: bytes, op: str = "run") -> Call:
        return Call(self.store, self.name, fn_bytes, op, shared=self._workers > 1)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """``invoke`` without waiting: a Future of the result. With ``workers`` > 1 calls run
        at once on the lease's workers; each commits as if alone (a call whose reads another
        worker's commit changed meanwhile runs again), so the state is as some order of the
        calls one at a time would leave it."""
        call = self._calls.get(fn)
        if call is None:
            call = self._calls[fn] = self._call(pickle_function(fn))
        executor = self._ensure()
        inner = executor.submit(
            call, self._with_ticket(executor, uuid.uuid4().hex), *args, **kwargs
        )
        outer: Future[Any] = Future()

        def done(f: Future[Any]) -> None:
            exc = f.exception()
            if exc is not None:
                outer.set_exception(exc)
                return
            result, notes = f.result()
            for note in self._notes(notes):
                self.notices.append(note)
            outer.set_result(result)

        inner.add_done_callback(done)
        return outer

    def snapshot(self) -> dict[str, Any]:
        """Swap the state out now (a snapshot made current atomically); returns seq, keys,
        bytes and seconds."""
        return dict(self._run(self._call(b"", "snapshot"), (), {}))

    def stats(self) -> dict[str, Any]:
        """seq (updates committed so far), keys, bytes, restored_seq (where this lease began),
        messages_direct (messages handed over by live senders rather than the store)."""
        return dict(self._run(self._call(b"", "stats"), (), {}))

    def release(self) -> None:
        """Swap out and give the lease back; the next call leases again."""
        if self._lease is not None:
            try:
                self.snapshot()
            finally:
                self._forget()  # an attached process leaves the lease to the client that took it

    def delete(self) -> None:
        """Remove the process and its state for good."""
        self._run(self._call(b"", "delete"), (), {})
        self._forget()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        where = self._lease.lease_id if self._lease is not None else "swapped out"
        return f"Process({self.name!r}, {where})"
