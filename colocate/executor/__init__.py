"""rFaaS-style executors: one per lease, one pinned, confined, sandboxed worker per core.

The node agent drives :class:`ExecutorSupervisor`; clients talk to the workers directly over
the wire protocol in :mod:`colocate.protocol` (see :mod:`colocate.client.executor`).
The supervisor is imported lazily: the prolog hook imports
:mod:`colocate.executor.confinement` (standard library only) to kill lease cgroups itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colocate.executor.supervisor import ExecutorHandle, ExecutorSupervisor

__all__ = ["ExecutorHandle", "ExecutorSupervisor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from colocate.executor import supervisor

        return getattr(supervisor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
