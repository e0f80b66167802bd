"""Serving a registry over HTTP for Prometheus (``GET /metrics``), and parsing listen addresses."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import generate_latest, make_wsgi_app, start_http_server
from prometheus_client.registry import CollectorRegistry

from colocate import units
from colocate.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["MetricsServer", "make_wsgi_app", "parse_listen", "render", "serve_metrics"]


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``0.0.0.0:9642``, ``[::]:9642``, ``:9642``) as (host, port); see
    :func:`colocate.units.parse_listen`. Raises ConfigError naming the value."""
    return units.parse_listen(listen, key="agent.metrics_listen")


@dataclass(slots=True)
class MetricsServer:
    """A running exposition server; ``port`` is the bound port (useful with port 0)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port (waits for the serving thread, at most 5 s)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, listen: str = "0.0.0.0:9642") -> MetricsServer:
    """Serve ``registry`` on ``listen`` (e.g. ``AgentConfig.metrics_listen``) in a daemon thread.

    Port 0 picks a free port (see ``MetricsServer.port``). Raises ConfigError for a bad
    address or a port that is taken.
    """
    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {listen} ({exc.strerror or exc}); choose a free port",
            key="agent.metrics_listen",
        ) from None
    bound = server.server_address
    log.info("serving metrics on %s:%s", bound[0], bound[1])
    return MetricsServer(str(bound[0]), int(bound[1]), server, thread)


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format 0.0.4, as a scrape would return it."""
    return generate_latest(registry)
