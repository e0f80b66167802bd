"""SPMD calls: one function on every rank of a lease group, talking through FMI.

::

    with client.lease(cores=2) as a, client.lease(cores=2) as b:
        group = Group([a.executor(), b.executor()])       # 4 ranks: a's workers, then b's
        sums = group.spmd(lambda comm, x: comm.allreduce(x * comm.rank), 10)

``LeaseExecutor.spmd(fn, *args)`` is the same on one lease. Every live worker (connection)
of every executor is a rank, in the order given; ``fn(comm, *args, **kwargs)`` runs once on
each and the results come back in rank order.

Errors: the exception a rank raised (the first by rank, its ``rank`` attribute set and a note
naming it) when a function raised; ``LeaseEvicted`` when a member's lease was taken back or
its worker vanished (every rank ends, none hangs); ``BadRequest`` for an unknown channel or
an executor made without its lease key.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from colocate.errors import BadRequest, ColocateError, LeaseError, LeaseEvicted
from colocate.fmi.channels import CHANNELS as _CHANNELS
from colocate.fmi_ticket import GroupTicket, group_key, sign_ticket

if TYPE_CHECKING:
    from colocate.client.executor import LeaseExecutor, _Connection

log = logging.getLogger(__name__)
_PREPARE = "colocate.fmi.rank:prepare"
_RUN = "colocate.fmi.rank:run"
TICKET_LIFETIME_S = 300.0  # tickets only open sockets during a call's setup


def _redis_address(redis: str | None) -> list[Any] | None:
    if redis is None:
        return None
    host, sep, port = redis.removeprefix("redis://").rpartition(":")
    if not sep or not port.isdigit():
        raise BadRequest(f"redis={redis!r}: give the Redis server as host:port")
    return [host.strip("[]") or "127.0.0.1", int(port)]


class Group:
    """The ranks of several leases' executors (``LeaseExecutor``), in order: one rank per
    live worker connection. Each executor must come from ``Lease.executor()`` (it carries the
    lease key that signs the group's tickets)."""

    def __init__(self, executors: Sequence[LeaseExecutor]) -> None:
        if not executors:
            raise BadRequest("a group needs at least one executor")
        for ex in executors:
            if not getattr(ex, "lease_key", ""):
                raise BadRequest(
                    f"executor of lease {ex.lease_id} has no lease key; make it with lease.executor()"
                )
        self.executors = list(executors)

    @property
    def size(self) -> int:
        return sum(ex.workers for ex in self.executors)

    def _ranks(self) -> list[tuple[LeaseExecutor, _Connection]]:
        return [(ex, conn) for ex in self.executors for conn in ex._conns if not conn.dead]

    def spmd(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        channel: str = "auto",
        redis: str | None = None,
        setup_timeout_s: float = 10.0,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(comm, *args, **kwargs)`` on every rank; the results in rank order.

        ``channel`` forces a channel ("shm", "local", "tcp", "redis"; "auto" lets the cost
        model pick), ``redis`` is a Redis server ("host:port") for the storage channel, used
        when forced or, for the whole group at once (logged as a warning), when a rank cannot
        take direct connections or ranks cannot reach each other during the setup (no rank
        has run ``fn`` then: the setup ends in a barrier). ``setup_timeout_s`` bounds how long a rank
        waits for the others to connect (seconds).
        """
        if channel not in _CHANNELS:
            raise BadRequest(f"channel {channel!r}: choose one of {', '.join(_CHANNELS)}")
        redis_addr = _redis_address(redis)
        if channel == "redis" and redis_addr is None:
            raise BadRequest("channel='redis' needs redis='host:port'")
        ranks = self._ranks()
        if not ranks:
            raise LeaseEvicted("no live worker in the group")
        group = secrets.token_hex(16)
        expires = time.time() + TICKET_LIFETIME_S
        keys = {ex.lease_id: bytes.fromhex(ex.lease_key) for ex, _ in ranks}
        hosts = {ex.lease_id: urlsplit(ex.lease_address).hostname or "127.0.0.1" for ex, _ in ranks}

        def signed(ex: LeaseExecutor, peers: tuple[tuple[str, int], ...]) -> tuple[str, str]:
            ticket = GroupTicket(group, ex.lease_id, hosts[ex.lease_id], expires, peers)
            return ticket.encode().decode(), sign_ticket(keys[ex.lease_id], ticket)

        first = {ex.lease_id: signed(ex, ()) for ex, _ in ranks}
        members = self._gather(
            [
                _submit(ex, conn, _PREPARE, (group, *first[ex.lease_id], channel))
                for ex, conn in ranks
            ]
        )
        blocked = [r for r, m in enumerate(members) if not m["direct"]]
        if blocked and len(members) > 1 and channel != "redis":
            r = blocked[0]
            where = f"rank {r} (lease {members[r]['lease']} on {members[r]['node']})"
            why = members[r].get("why", "no listener")
            if redis_addr is None or channel == "tcp":
                raise ColocateError(
                    f"FMI: {where} cannot take direct connections ({why}); "
                    + (
                        "pass redis='host:port' to run the group through Redis"
                        if redis_addr is None
                        else "channel='tcp' is impossible; use channel='auto' to go through Redis"
                    )
                )
            log.warning(
                "FMI: %s cannot take direct connections (%s): the whole group of %d ranks "
                "goes through Redis at %s:%s",
                where,
                why,
                len(members),
                *redis_addr,
            )
        peers = tuple((str(m["tcp"][0]), int(m["tcp"][1])) for m in members if m["tcp"])
        if redis_addr is not None:
            peers += ((str(redis_addr[0]), int(redis_addr[1])),)
        second = {ex.lease_id: signed(ex, peers) for ex, _ in ranks}
        key = group_key([keys[lid] for lid in dict.fromkeys(ex.lease_id for ex, _ in ranks)], group)
        from colocate.client.executor import _pickle_function

        fn_bytes = _pickle_function(fn)
        futures = [
            _submit(
                ex,
                conn,
                _RUN,
                (
                    fn_bytes,
                    group,
                    rank,
                    members,
                    key.hex(),
                    channel,
                    redis_addr,
                    *second[ex.lease_id],
                    args,
                    kwargs,
                    setup_timeout_s,
                ),
            )
            for rank, (ex, conn) in enumerate(ranks)
        ]
        try:
            return self._gather(futures)
        except LeaseEvicted:
            if channel != "auto" or redis_addr is None or not _unreachable(futures):
                raise
        # no rank ran fn (the setup ends in a barrier): run the whole group through Redis
        log.warning(
            "FMI: ranks of group %s could not reach each other directly (%s); the whole group "
            "runs again through Redis at %s:%s",
            group,
            "; ".join(f"rank {r}: {f.exception()}" for r, f in enumerate(futures) if f.exception()),
            *redis_addr,
        )
        return self.spmd(
            fn,
            *args,
            channel="redis",
            redis=redis,
            setup_timeout_s=setup_timeout_s,
            **kwargs,
        )

    @staticmethod
    def _gather(futures: list[Future[Any]]) -> list[Any]:
        """Every rank's result, or the error that ended the call (see the module docstring)."""
        results: list[Any] = []
        errors: dict[int, BaseException] = {}
        for rank, fut in enumerate(futures):
            exc = fut.exception()
            if exc is None:
                results.append(fut.result())
            else:
                errors[rank] = exc
                results.append(None)
        if not errors:
            return results
        from colocate.fmi.comm import GroupAborted

        for rank, exc in errors.items():  # what a function raised comes first
            if not isinstance(exc, (GroupAborted, LeaseError)):
                if not hasattr(exc, "rank"):
                    try:
                        exc.rank = rank  # type: ignore[attr-defined]
                        exc.add_note(f"raised on rank {rank} of {len(futures)}")
                    except Exception:
                        pass
                raise exc
        for exc in errors.values():
            if isinstance(exc, LeaseError):
                if isinstance(exc, LeaseEvicted):
                    raise exc
                raise LeaseEvicted(
                    f"a member of the group ended: {exc}", lease_id=exc.lease_id
                ) from exc
        raise next(iter(errors.values()))


def _unreachable(futures: list[Future[Any]]) -> bool:
    """The call failed in the group's setup only, and because some rank could not reach
    another (not a refused connection, a raise or an eviction)."""
    errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    return (
        bool(failed)
        and all(isinstance(e, LeaseEvicted) and getattr(e, "fmi_setup", False) for e in failed)
        and any(getattr(e, "fmi_unreachable", False) for e in failed)
    )


def _submit(ex: LeaseExecutor, conn: _Connection, fn: str, args: tuple[Any, ...]) -> Future[Any]:
    """Call ``fn(*args)`` on the worker behind ``conn`` (one rank)."""
    try:
        data, cid, idx = ex._frame(fn, args, {})
    except ColocateError as exc:
        failed: Future[Any] = Future()
        failed.set_exception(exc)
        return failed
    return conn.submit(data, (cid,), idx, ex._fn_frames)[0]
