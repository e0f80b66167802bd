"""The Python client: leases from the broker, executors on them.

``Client(broker_url).lease(cores, memory, duration)`` returns a :class:`Lease` (a context
manager); ``lease.executor()`` returns a ``LeaseExecutor``, a
``concurrent.futures.Executor`` that talks straight to the leased executor.
"""

from __future__ import annotations

from typing import Any

from colocate.client.lease import DEFAULT_BROKER, Client, Lease


def __getattr__(name: str) -> Any:
    if name == "LeaseExecutor":  # imported on use: the invocation path has its own deps
        from colocate.client.executor import LeaseExecutor

        return LeaseExecutor
    raise AttributeError(f"module 'colocate.client' has no attribute {name!r}")


__all__ = ["DEFAULT_BROKER", "Client", "Lease", "LeaseExecutor"]
