"""Prometheus /metrics endpoint for a process (series names start with tandem_)."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves `registry` on http://host:port/metrics from a daemon thread. Close is idempotent."""

    def __init__(self, listen: str, registry: CollectorRegistry = REGISTRY) -> None:
        host, _, port = listen.rpartition(":")
        self._server: WSGIServer | None
        self._thread: threading.Thread | None
        self._server, self._thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
        self.port = int(self._server.server_port)
        self.host = host or "0.0.0.0"
        log.info("metrics listening", extra={"metrics_port": self.port})

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
