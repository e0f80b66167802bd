"""colocate: serverless functions on the idle cores and unused memory of HPC batch jobs.

The client API (``colocate.Client``) is imported lazily so that light entry points
(the Slurm prolog hook) do not pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from colocate.errors import (
    BackendUnavailable,
    BadRequest,
    ColocateError,
    ConfigError,
    ExecutorLost,
    LeaseDenied,
    LeaseError,
    LeaseEvicted,
    LeaseExpired,
    PayloadTooLarge,
    SlurmUnavailable,
    TraceFormatError,
    Unauthorized,
)

if TYPE_CHECKING:  # typed for checkers, imported on first use at run time
    from colocate.client import Client

__version__ = "0.1.0"

_LAZY = {"Client": "colocate.client"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'colocate' has no attribute {name!r}")


__all__ = [
    "BackendUnavailable",
    "BadRequest",
    "Client",
    "ColocateError",
    "ConfigError",
    "ExecutorLost",
    "LeaseDenied",
    "LeaseError",
    "LeaseEvicted",
    "LeaseExpired",
    "PayloadTooLarge",
    "SlurmUnavailable",
    "TraceFormatError",
    "Unauthorized",
    "__version__",
]
