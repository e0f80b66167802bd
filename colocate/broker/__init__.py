"""The lease broker: nodes' offers in, leases out (see :mod:`colocate.broker.app` for the API).

The names below are imported on first use (PEP 562): the client imports
:mod:`colocate.broker.api` (pydantic only) and must not load FastAPI and uvicorn with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colocate.broker.app import create_app
    from colocate.broker.broker import Broker
    from colocate.broker.secret import default_secret_file, load_or_create_secret

_WHERE = {
    "Broker": "broker",
    "create_app": "app",
    "default_secret_file": "secret",
    "load_or_create_secret": "secret",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Broker", "create_app", "default_secret_file", "load_or_create_secret"]
