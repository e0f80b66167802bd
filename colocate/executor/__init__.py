"""rFaaS-style executors: one per lease, one pinned, confined, unprivileged worker per core.

The node agent drives :class:`ExecutorSupervisor`; clients talk to the workers directly over
the wire protocol in :mod:`colocate.protocol` (see :mod:`colocate.client.executor`).
"""

from __future__ import annotations

from colocate.executor.supervisor import ExecutorHandle, ExecutorSupervisor

__all__ = ["ExecutorHandle", "ExecutorSupervisor"]
