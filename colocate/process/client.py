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
import os
import sys
import sysconfig
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colocate.errors import ConfigError, ExecutorLost, LeaseEvicted, LeaseExpired
from colocate.process.runtime import Call

if TYPE_CHECKING:
    from colocate.client.executor import LeaseExecutor
    from colocate.client.lease import Client, Lease

DEFAULT_STORE = "/var/lib/colocate/processes"
STORE_ENV = "COLOCATE_PROCESS_STORE"


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
    ``<store>/<uid>/<name>``, mode 0700, written by the lease's owner.
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
    ) -> None:
        if (
            not isinstance(name, str)
            or not name
            or "/" in name
            or name in (".", "..")
            or len(name) > 200
        ):
            raise ConfigError(f"process name {name!r}: use 1-200 characters without '/'")
        if cores != 1:
            raise ConfigError(
                f"process {name!r}: cores={cores!r}; a process runs on one worker (its state lives "
                "in that worker), so ask for cores=1 and use threads or several processes"
            )
        self.name = name
        self.store = store or os.environ.get(STORE_ENV) or DEFAULT_STORE
        if not os.path.isabs(self.store):
            raise ConfigError(
                f"process store {self.store!r} must be an absolute path every node sees"
            )
        self._client = client
        self._memory = memory
        self._duration = duration
        self._lease: Lease | None = None
        self._executor: LeaseExecutor | None = None
        self._calls: dict[Any, Call] = {}
        self.notices: list[str] = []
        self.leases: list[str] = []  # ids of the leases this process ran on, oldest first

    @property
    def lease(self) -> Lease | None:
        """The lease the process runs on now (None while swapped out)."""
        return self._lease

    def _ensure(self) -> LeaseExecutor:
        if self._executor is None:
            lease = self._client.lease(1, self._memory, self._duration)
            self._lease = lease
            self.leases.append(lease.lease_id)
            self._executor = lease.executor(workers=1)
        return self._executor

    def _forget(self) -> None:
        lease, self._lease, self._executor = self._lease, None, None
        if lease is not None:
            with contextlib.suppress(Exception):  # already gone: evicted or expired
                lease.release()

    def _run(self, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        executor = self._ensure()
        try:
            result, notes = executor.invoke(call, *args, **kwargs)
        except (LeaseEvicted, LeaseExpired, ExecutorLost):
            self._forget()  # the next call leases again and finds the state in the store
            raise
        for note in notes:
            self.notices.append(note)
            warnings.warn(note, StateRolledBack, stacklevel=3)
        return result

    def invoke(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(state, *args, **kwargs)`` in the process; its changes to ``state`` commit when
        it returns (none if it raises or the lease is taken back meanwhile, which raises
        LeaseEvicted here: call again, the process comes back on a new lease)."""
        call = self._calls.get(fn)
        if call is None:
            call = self._calls[fn] = Call(self.store, self.name, pickle_function(fn))
        return self._run(call, args, kwargs)

    def snapshot(self) -> dict[str, Any]:
        """Swap the state out now (a snapshot made current atomically); returns seq, keys,
        bytes and seconds."""
        return dict(self._run(Call(self.store, self.name, b"", "snapshot"), (), {}))

    def stats(self) -> dict[str, Any]:
        """seq (updates committed so far), keys, bytes, restored_seq (where this lease began)."""
        return dict(self._run(Call(self.store, self.name, b"", "stats"), (), {}))

    def release(self) -> None:
        """Swap out and give the lease back; the next call leases again."""
        if self._executor is not None:
            try:
                self.snapshot()
            finally:
                self._forget()

    def delete(self) -> None:
        """Remove the process and its state for good."""
        self._run(Call(self.store, self.name, b"", "delete"), (), {})
        self._forget()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        where = self._lease.lease_id if self._lease is not None else "swapped out"
        return f"Process({self.name!r}, {where})"
