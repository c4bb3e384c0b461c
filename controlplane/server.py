"""`tandem-controlplane`: one control-plane replica (Admin API; the leader probes worker health).

    python -m controlplane.server --etcd 127.0.0.1:2379 --listen 0.0.0.0:7070

Any number of replicas may run; all serve the Admin API from their own
registry view, and the one elected leader (registry.election) runs the
health prober. Lifecycle: come up even while etcd is down (reads answer
once the view loads, leadership once a lease is granted); on SIGTERM or
SIGINT: health NOT_SERVING, stop probing, resign and revoke the lease (so
leadership passes at once), then stop the gRPC server with a grace period.
docs/controlplane.md lists the settings.
"""

# setting() returns a dataclasses.Field, as field() does; ruff cannot see through the wrapper.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controlplane.admin import AdminServicer
from controlplane.auth import BearerTokenInterceptor, load_token
from controlplane.health_policy import MAX_THRESHOLD, Thresholds
from controlplane.planner import PlannerConfig
from controlplane.planner.inputs import ROLE_NAMES
from controlplane.planner.service import MODES as PLANNER_MODES
from controlplane.planner.service import Planner, PlannerMetricsSink, RoundResult
from controlplane.prober import Prober
from registry.election import Election
from registry.etcd_client import EtcdClient
from registry.session import LeaseSession
from registry.settings import CommonSettings
from registry.store import Registry
from registry.view import RegistryView
from runtime.config import ConfigError, load_config
from runtime.event_loop import loop_runner
from runtime.logs import configure_logging
from runtime.metrics import MetricsEndpoint
from runtime.server import (
    GrpcService,
    TlsFiles,
    advertised_endpoint,
    announce_ready,
    install_stop_signals,
)
from runtime.setting import check_ranges, setting
from tandem.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger("controlplane.server")  # not "__main__" under python -m

PROG = "tandem-controlplane"
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ControlPlaneSettings(CommonSettings):
    listen: str = setting("0.0.0.0:7070", "Admin gRPC listen address HOST:PORT (port 0: any)")
    advertise_host: str = setting(
        "", "host other processes use to reach this replica (default: the listen host, 127.0.0.1 for 0.0.0.0)")
    replica_id: str = setting("", "name of this replica, 1..128 printable characters (default HOSTNAME-PID)")
    probe_interval: float = setting(2.0, "time between health probe rounds (leader)", min=0.05, max=3600,
                                    unit="seconds")
    probe_timeout: float = setting(1.0, "deadline of one health probe", min=0.05, max=60, unit="seconds")
    probe_concurrency: int = setting(64, "health probes in flight at once", min=1, max=4096)
    failure_threshold: int = setting(3, "consecutive failed probes that make a worker NOT_SERVING",
                                     min=1, max=MAX_THRESHOLD)
    success_threshold: int = setting(2, "consecutive good probes that make a NOT_SERVING worker SERVING again",
                                     min=1, max=MAX_THRESHOLD)
    admin_token: str = setting("", "bearer token required for Admin mutations (empty: none required)",
                               secret=True)
    admin_token_file: Path | None = setting(None, "file holding the admin token")
    tls_cert: Path | None = setting(None, "PEM certificate of the Admin gRPC server")
    tls_key: Path | None = setting(None, "PEM private key of the Admin gRPC server")
    tls_client_ca: Path | None = setting(None, "PEM CA bundle; when set, clients must present a certificate it signed")
    planner_mode: str = setting("recommend", "the leader's role planner: off, recommend (writes plans only) or "
                                "enact (also writes the role intents that carry them out)", choices=PLANNER_MODES)
    planner_interval_s: float = setting(30.0, "time between planning rounds", min=0.1, max=3600, unit="seconds")
    planner_min_gain: float = setting(PlannerConfig.min_gain, "switch roles only when the predicted goodput "
                                      "gains at least this fraction", min=0, max=10)
    planner_min_dwell_s: float = setting(PlannerConfig.min_dwell_s, "a worker keeps a role at least this long "
                                         "before the planner moves it again", min=0, max=86400, unit="seconds")
    planner_max_switches: int = setting(PlannerConfig.max_switches, "workers switched per planning round, "
                                        "per model", min=1, max=1000)

    def __post_init__(self) -> None:
        self.replica_id = self.replica_id or _default_replica_id()

    def validate(self) -> None:
        """ConfigError naming the first bad setting: declared ranges (as load_config checks them), then
        what spans settings (TLS pairs, files that must exist, the token, etcd endpoints)."""
        check_ranges(self)
        if not self.replica_id.isprintable() or not 0 < len(self.replica_id) <= 128:
            raise ConfigError(f"--replica-id must be 1..128 printable characters, got {self.replica_id!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "admin_token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{name}: no such file {path}")
        try:
            self.token()
            self.etcd_settings()
            self.keys()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def planner_config(self) -> PlannerConfig:
        return PlannerConfig(min_gain=self.planner_min_gain, min_dwell_s=self.planner_min_dwell_s,
                             max_switches=self.planner_max_switches)

    def token(self) -> str:
        return load_token(self.admin_token, self.admin_token_file)

    def tls(self) -> TlsFiles | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca)


class ControlPlaneMetrics:
    """The replica's Prometheus series, in a registry of its own (several replicas may share a process).

    `is_leader` is labelled with the replica id, so a dashboard names the leader
    (and shows two at once, should that ever happen).
    """

    def __init__(self, replica_id: str) -> None:
        self.registry = CollectorRegistry()
        self.is_leader = Gauge("tandem_controlplane_is_leader", "1 while this replica leads", ["replica"],
                               registry=self.registry).labels(replica=replica_id)
        self.verdicts = Counter("tandem_controlplane_verdicts", "health verdicts written, by status",
                                ["status"], registry=self.registry)
        self.probe_seconds = Histogram(
            "tandem_controlplane_probe_seconds", "duration of one grpc.health.v1 probe", registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.view_staleness = Gauge("tandem_controlplane_view_staleness_seconds",
                                    "seconds since the registry view last heard from etcd", registry=self.registry)
        self.planner = PlannerMetrics(self.registry)


class PlannerMetrics(PlannerMetricsSink):
    """The planner's last word per model: predicted goodput of the current, planned and best assignment,
    what it saw, and the switches it asked for."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.goodput = Gauge("tandem_planner_predicted_goodput_rps",
                             "requests/s within the SLO the planner predicts, by assignment", ["model", "assignment"],
                             registry=registry)
        self.arrivals = Gauge("tandem_planner_demand_arrival_rps", "arrival rate the routers report",
                              ["model"], registry=registry)
        self.workers = Gauge("tandem_planner_planned_workers", "workers per role in the latest plan",
                             ["model", "role"], registry=registry)
        self.switches = Counter("tandem_planner_switches", "role intents the planner wrote", ["model", "role"],
                                registry=registry)
        self.rounds = Counter("tandem_planner_plans", "plans computed, by whether the fenced write landed",
                              ["model", "written"], registry=registry)

    def planned(self, result: RoundResult) -> None:
        record, model = result.record, result.model
        self.rounds.labels(model=model, written=str(result.written).lower()).inc()
        if not result.written:
            return
        for assignment, value in (("current", record.current_goodput_rps), ("planned", record.planned_goodput_rps),
                                  ("best", record.best_goodput_rps)):
            self.goodput.labels(model=model, assignment=assignment).set(value)
        self.arrivals.labels(model=model).set(record.demand.arrival_rate_rps)
        for role, name in ROLE_NAMES.items():
            self.workers.labels(model=model, role=name).set(sum(1 for w in record.workers if w.planned_role == role))
        for intent in result.intents:
            self.switches.labels(model=model, role=ROLE_NAMES[intent.role]).inc()


async def serve(settings: ControlPlaneSettings) -> None:
    """Runs one replica until SIGTERM/SIGINT."""
    keys = settings.keys()
    client = await EtcdClient(settings.etcd_settings()).connect()
    session = LeaseSession(client, ttl=settings.lease_ttl, name=settings.replica_id)
    view = RegistryView(client, keys, probe_interval=min(1.0, settings.lease_ttl / 3))
    metrics = ControlPlaneMetrics(settings.replica_id)
    token = settings.token()
    service = GrpcService(settings.listen, service_names=[ADMIN_SERVICE], tls=settings.tls(),
                          interceptors=[BearerTokenInterceptor(token)] if token else [])
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminServicer(view, Registry(client, keys), replica_id=settings.replica_id), service.server)
    endpoint_server: MetricsEndpoint | None = None
    election: Election | None = None
    prober: Prober | None = None
    planner: Planner | None = None
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        session.start()
        view.start()
        port = await service.start(serving=True)
        endpoint = advertised_endpoint(settings.listen, port, settings.advertise_host)
        election = Election(client, keys, session, view, replica_id=settings.replica_id, endpoint=endpoint,
                            on_change=lambda leading: metrics.is_leader.set(1 if leading else 0))
        prober = Prober(client, keys, view, election, replica_id=settings.replica_id,
                        interval=settings.probe_interval, timeout=settings.probe_timeout,
                        thresholds=Thresholds(settings.failure_threshold, settings.success_threshold),
                        concurrency=settings.probe_concurrency, peer_tls=settings.peer_tls(),
                        on_probe=metrics.probe_seconds.observe,
                        on_verdict=lambda status: metrics.verdicts.labels(status=status).inc())
        planner = Planner(client, keys, view, election, replica_id=settings.replica_id,
                          mode=settings.planner_mode, interval_s=settings.planner_interval_s,
                          config=settings.planner_config(), sink=metrics.planner)
        metrics.view_staleness.set_function(lambda: min(view.staleness(), 1e9))
        if settings.metrics_listen:
            endpoint_server = MetricsEndpoint(settings.metrics_listen, metrics.registry)
        election.start()
        prober.start()
        planner.start()
        # Answer reads from a loaded view when etcd is up; come up regardless when it is not.
        await view.wait_synced(settings.etcd_timeout * 2)
        log.info("control plane serving", extra={"replica_id": settings.replica_id, "endpoint": endpoint,
                                                  "auth": bool(token), "tls": settings.tls() is not None})
        announce_ready(settings.ready_file, endpoint=endpoint, replica_id=settings.replica_id, pid=os.getpid(),
                       metrics_port=endpoint_server.port if endpoint_server else 0)
        await stop.wait()
    finally:
        if endpoint_server is not None:
            endpoint_server.draining()
        with contextlib.suppress(Exception):
            await service.set_serving(False)
        if planner is not None:
            await planner.close()
        if prober is not None:
            await prober.close()
        if election is not None:
            await election.close()
        await session.close()
        await service.stop(settings.shutdown_grace)
        await view.close()
        await client.close()
        if endpoint_server is not None:
            endpoint_server.close()
        log.info("control plane stopped", extra={"replica_id": settings.replica_id})


def main(argv: Sequence[str] | None = None) -> None:
    try:
        settings = load_config(ControlPlaneSettings, argv, prog=PROG, section="controlplane",
                               description="Tandem control-plane replica: Admin API, leader election, health prober")
        settings.validate()
        settings.peer_tls()
        run = loop_runner(settings.event_loop)
    except (ConfigError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(PROG, settings.log_level, settings.log_format)
    try:
        run(serve(settings))
    except OSError as exc:  # the listen address is taken, a TLS file vanished, ...
        log.error("control plane cannot start", extra={"error": str(exc)})
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
