"""The lease broker: nodes' offers in, leases out (see :mod:`colocate.broker.app` for the API)."""

from __future__ import annotations

from colocate.broker.app import create_app
from colocate.broker.broker import Broker
from colocate.broker.secret import default_secret_file, load_or_create_secret

__all__ = ["Broker", "create_app", "default_secret_file", "load_or_create_secret"]
