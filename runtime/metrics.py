"""Prometheus /metrics and /healthz for a process (series names start with tandem_).

The metrics port answers three paths and nothing else:

- `/metrics`: the Prometheus text (promtool-clean: no `*_created` series);
- `/healthz`: 200 with `ok` while the process serves, 200 with `draining`
  once it has begun to shut down (it is still alive and finishing accepted
  work: a liveness check must not kill it then; readiness is the gRPC health
  service, NOT_SERVING from the same moment);
- anything else: 404.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Generic, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, disable_created_metrics, make_wsgi_app

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

# Each counter and histogram would also export a `*_created` gauge (the time it
# was first touched): noise for Prometheus, which tracks resets on its own.
disable_created_metrics()

HEALTHY = "ok"
DRAINING = "draining"


M = TypeVar("M", Counter, Histogram)


class Series(Generic[M]):
    """A labelled metric whose children are looked up once per label values.

    prometheus-client's labels() validates and takes a lock on every call,
    and a router or worker request touches several series. Use it only for
    label values from bounded sets (models, status names, reasons, roles,
    transports): the cache keeps every child it made.
    """

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        """The child for these label values, in the order the metric declares its label names."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would flood stderr with non-JSON lines."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


def metrics_app(registry: CollectorRegistry, health: Callable[[], str]) -> WSGIApplication:
    """The WSGI app behind the metrics port: /metrics, /healthz, 404 for the rest."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{health()}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: this port serves /metrics and /healthz\n"]

    return app


class MetricsEndpoint:
    """Serves `registry` on http://host:port/metrics (and /healthz) from a daemon thread.

    `draining()` switches /healthz to `draining`, `serving()` back; both safe to call twice.
    Close is idempotent.
    """

    def __init__(self, listen: str, registry: CollectorRegistry = REGISTRY) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "0.0.0.0"
        self._state = HEALTHY
        self._server: WSGIServer | None = make_server(
            self.host, int(port), metrics_app(registry, lambda: self._state),
            server_class=_ThreadingWSGIServer6 if ":" in self.host else _ThreadingWSGIServer,
            handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics listening", extra={"metrics_port": self.port})

    def draining(self) -> None:
        self._state = DRAINING

    def serving(self) -> None:
        """Back from draining (an operator undid a drain)."""
        self._state = HEALTHY

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
