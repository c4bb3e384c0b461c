"""The gRPC server lifecycle every Tandem service shares.

    service = GrpcService("0.0.0.0:50051", service_names=[...], tls=tls)
    add_PrefillServicer_to_server(servicer, service.server)
    port = await service.start()        # health SERVING for "" and each name
    ...
    await service.stop(grace=10)        # NOT_SERVING, drain, stop

Health: `grpc.health.v1` answers for the empty service name (the whole
process) and for each full service name. Reflection lists the same names.
`stop()` first flips health to NOT_SERVING so probes and routers stop
sending work, then lets in-flight RPCs finish for up to `grace` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime import sdnotify

log = logging.getLogger(__name__)

# Large KV chunks and long prompts travel over these servers.
DEFAULT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS server; with `client_ca`, clients must present a cert."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


class GrpcService:
    """A grpc.aio server with health and reflection. Start once, stop once (stop is idempotent)."""

    def __init__(
        self,
        listen: str,
        *,
        service_names: Sequence[str],
        tls: TlsFiles | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, int]] = DEFAULT_OPTIONS,
    ) -> None:
        self.listen = listen
        self.service_names = list(service_names)
        self.tls = tls
        self.server = grpc.aio.server(interceptors=list(interceptors), options=list(options))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0
        self._stopped = False

    async def start(self, serving: bool = True) -> int:
        """Bind and start; returns the bound port (useful with port 0)."""
        try:
            if self.tls is not None:
                self.port = self.server.add_secure_port(self.listen, self.tls.server_credentials())
            else:
                self.port = self.server.add_insecure_port(self.listen)
        except RuntimeError:  # grpc raises RuntimeError("Failed to bind ...")
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}: address in use or not available")
        await self.server.start()
        await self.set_serving(serving)
        log.info("grpc server listening", extra={"listen": self.listen, "port": self.port})
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 10.0) -> None:
        """NOT_SERVING, then stop accepting RPCs and wait up to `grace` for in-flight ones."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            await self.set_serving(False)
        await self.server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def advertised_endpoint(listen: str, port: int, advertise_host: str) -> str:
    """host:port other processes should dial, given what we listen on."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if advertise_host:
        host = advertise_host
    elif host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop` (the first graceful, a second one is left to the default)."""
    loop = asyncio.get_running_loop()

    def _on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        log.info("signal received, shutting down", extra={"signal": name})
        stop.set()
        sdnotify.notify_stopping(f"{name} received: draining")
        loop.remove_signal_handler(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum)


def announce_ready(path: Path | None, **info: object) -> None:
    """Atomically write `info` as JSON to `path` (a supervisor waits for it), then tell systemd.

    A service started with port 0 reports the port it got this way; the
    file appears only once the service is serving. Under a Type=notify unit
    ($NOTIFY_SOCKET set) it also sends READY=1 with `info` as STATUS=; a
    no-op elsewhere. Safe to call twice.
    """
    if path is not None:
        import json
        import os

        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)
    sdnotify.notify_ready(sdnotify.status_line(info))
