"""The life of a worker process, whichever role it starts in.

    start gRPC (health NOT_SERVING) -> register STARTING -> claim GPUs
    -> load the engine -> register READY (in the role intent's role, if
       one names a role it can take), health SERVING, ready file
    -> serve ... role intents switch the role live (worker.role_switcher) ...
    -> ... SIGTERM/SIGINT or drain intent ...
    -> stop admitting (UNAVAILABLE), state DRAINING, finish in-flight work
    -> revoke the lease (record and claims vanish) -> stop gRPC -> close engine

GPUs are claimed before the model loads: a worker pointed at GPUs another
worker holds exits at once with EXIT_GPU_CLAIMED (the systemd units do not
restart on it) instead of loading weights onto a busy GPU first. The claim
waits for etcd as long as it takes; SIGTERM/SIGINT ends that wait.

A drain intent (tandemctl drain) runs the same drain but keeps the process
up and deregistered; removing the intent registers it again. A drain or a
stop signal during a role switch wins: the switch stops, the drain goes on.

Every worker mounts the services of both roles (Prefill with its KV source,
and Decode) over one loaded engine; the role gate (worker.role_gate) takes
only the current role's requests. `tandem-prefill` and `tandem-decode`
differ only in the role they start in.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Sequence

from engine.base import Engine, EngineError, create_engine
from registry.claims import GpuAlreadyClaimed
from runtime import __version__ as tandem_version
from runtime.event_loop import loop_runner
from runtime.metrics import MetricsEndpoint
from runtime.server import GrpcService, TlsFiles, advertised_endpoint, announce_ready, install_stop_signals
from runtime.tasks import cancel_and_wait
from tandem.v1 import registry_pb2, worker_pb2, worker_pb2_grpc
from worker.admission import Admission
from worker.context import WorkerContext, WorkerRole
from worker.decode_service import DecodeRole
from worker.load import LoadReporter, WorkerLoadServicer
from worker.metrics import WorkerMetrics
from worker.prefill_service import PrefillRole
from worker.registration import WorkerRegistration, model_shape_to_pb
from worker.role_gate import RoleGate
from worker.role_switch import Role, role_name, switchable_roles
from worker.role_switcher import RoleSwitcher
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Exit statuses. The worker units list the ones a restart cannot fix in
# RestartPreventExitStatus= (tests/integration/test_systemd_units.py checks it).
EXIT_BAD_SETTINGS = 2
EXIT_ENGINE_FAILED = 3
EXIT_GPU_CLAIMED = 4
NO_RESTART_EXIT_STATUSES = (EXIT_BAD_SETTINGS, EXIT_GPU_CLAIMED)


def _load_snapshot(ctx: WorkerContext, roles: Sequence[WorkerRole]) -> worker_pb2.LoadReport:
    stats = ctx.engine.stats()
    report = worker_pb2.LoadReport(
        worker_id=ctx.worker_id,
        role=ctx.role,
        queued_prefill_tokens=stats.queued_prefill_tokens,
        active_requests=ctx.admission.in_flight,
        active_sequences=stats.active_sequences,
        kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_total=stats.kv_blocks_total,
        kv_block_size_tokens=stats.kv_block_size,
        # A switching worker takes no new work either: routers stop sending it some before etcd tells them.
        draining=ctx.admission.draining or ctx.gate.switching,
        max_batch_size=stats.max_batch_size,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
    )
    for role in roles:
        role.fill_load(report)
    return report


async def run_worker(settings: WorkerSettings, start_role: Role) -> int:
    """Runs a worker, starting in `start_role`, until SIGTERM/SIGINT; returns the process exit status."""
    worker_id = settings.resolved_worker_id(role_name(start_role))
    node = settings.resolved_node()
    metrics = MetricsEndpoint(settings.metrics_listen) if settings.metrics_listen else None
    engine = create_engine(settings.engine, settings.engine_config())
    switchable = switchable_roles(type(engine).serves_both_roles)
    admission = Admission(worker_id, settings.max_queued_requests, settings.max_requests_per_peer)
    gate = RoleGate(worker_id, start_role)
    roles: tuple[WorkerRole, ...] = (PrefillRole(), DecodeRole())
    tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca) \
        if settings.tls_cert and settings.tls_key else None
    service = GrpcService(settings.listen, service_names=[*(n for r in roles for n in r.service_names),
                                                          "tandem.v1.Worker"], tls=tls)
    host = settings.advertise_host or socket.gethostname()
    ctx = WorkerContext(settings, worker_id, node, host, engine, admission,
                        WorkerMetrics(role_name(start_role), worker_id, lambda: _load_snapshot(ctx, roles),
                                      model=engine.model_name), gate)
    for role in roles:
        role.mount(ctx, service.server)
    worker_pb2_grpc.add_WorkerServicer_to_server(
        WorkerLoadServicer(LoadReporter(lambda: _load_snapshot(ctx, roles), engine.kv_events),
                           min_interval_ms=settings.min_load_interval_ms,
                           max_watchers=settings.max_load_watchers), service.server)

    stop = asyncio.Event()
    install_stop_signals(stop)
    port = await service.start(serving=False)
    endpoint = advertised_endpoint(settings.listen, port, settings.advertise_host)
    for role in roles:
        await role.started(endpoint)
    record = _starting_record(settings, start_role, switchable, worker_id, node, endpoint, host, metrics)
    switcher = RoleSwitcher(gate=gate, admission=admission, registration=lambda: registration,
                            metrics=ctx.metrics, switchable=switchable, grace_s=settings.role_switch_grace)

    async def on_drain(wanted: bool) -> None:
        if wanted:
            switcher.abandon()
            admission.start_draining()
            if metrics is not None:
                metrics.draining()
            await registration.set_state(registry_pb2.WORKER_STATE_DRAINING)
            await admission.wait_idle(timeout=float("inf"))
            if admission.draining:
                await registration.deregister()
                await service.set_serving(False)
        else:
            admission.stop_draining()
            if metrics is not None:
                metrics.serving()
            await registration.register_again()
            await registration.set_state(registry_pb2.WORKER_STATE_READY)
            await service.set_serving(True)
            switcher.reconsider()

    registration = WorkerRegistration(settings, record, on_drain, switcher.on_intent)
    status = 0
    try:
        await registration.start()
        try:
            if not await _unless_stopped(stop, registration.claim_gpus(settings.gpu_uuid_list())):
                log.info("stopped while waiting to claim GPUs; the model was not loaded")
                return 0
        except GpuAlreadyClaimed as exc:
            log.error("cannot claim GPUs: %s; exiting with status %d without loading the model",
                      exc, EXIT_GPU_CLAIMED)
            return EXIT_GPU_CLAIMED
        log.info("loading engine", extra={"engine": settings.engine, "model": settings.model})
        try:
            await engine.start()
        except EngineError as exc:
            log.error("engine failed to start: %s", exc)
            return EXIT_ENGINE_FAILED
        _describe_engine(record, engine)
        # An intent set before this process started (or while it loaded) names the role it first serves.
        record.role = switcher.role_at_start(await registration.role_intent(timeout=settings.lease_ttl))
        record.role_since_unix_ms = int(time.time() * 1000)
        switcher.ready = True
        if not admission.draining:
            await registration.set_state(registry_pb2.WORKER_STATE_READY)
            await service.set_serving(True)
            switcher.reconsider()  # an intent changed while READY was written
        announce_ready(settings.ready_file, endpoint=endpoint, worker_id=worker_id, pid=os.getpid(),
                       metrics_port=metrics.port if metrics else 0)
        log.info("worker ready", extra={"worker_id": worker_id, "endpoint": endpoint, "role": role_name(gate.role)})
        await stop.wait()
    finally:
        if metrics is not None:
            metrics.draining()
        await switcher.close()
        status = await _shutdown(settings, service, admission, registration, roles, engine)
        if metrics is not None:
            metrics.close()
    return status


def _starting_record(settings: WorkerSettings, role: Role, switchable: Sequence[Role], worker_id: str, node: str,
                     endpoint: str, host: str, metrics: MetricsEndpoint | None) -> registry_pb2.WorkerRecord:
    """The record a worker registers before its GPUs are claimed and its model is loaded (STARTING)."""
    return registry_pb2.WorkerRecord(
        worker_id=worker_id, role=role, switchable_roles=switchable, model=settings.served_model_name or settings.model,
        endpoint=endpoint, node=node, gpu_uuids=settings.gpu_uuid_list(), gpu_type=settings.gpu_type,
        gpu_count=settings.gpu_count, engine=settings.engine, state=registry_pb2.WORKER_STATE_STARTING,
        versions=registry_pb2.VersionInfo(tandem=tandem_version, api="tandem.v1"),
        simulated=settings.engine == "sim", kv_transports=settings.transports(),
        metrics_endpoint=f"{host}:{metrics.port}" if metrics else "",
        started_at_unix_ms=int(time.time() * 1000), host=host,
    )


def _describe_engine(record: registry_pb2.WorkerRecord, engine: Engine) -> None:
    """Adds what only the loaded engine knows: its capacity and its model's shape (the router prices with it)."""
    stats = engine.stats()
    record.capacity.CopyFrom(registry_pb2.WorkerCapacity(
        kv_blocks_total=stats.kv_blocks_total, kv_block_size_tokens=stats.kv_block_size,
        max_batch_size=stats.max_batch_size, max_context_tokens=engine.max_context_tokens))
    record.model_shape.CopyFrom(model_shape_to_pb(engine.model_shape))


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[object]) -> bool:
    """Awaits `work` unless `stop` is set first, which cancels it. True when `work` finished.

    `work`'s own exception propagates; so does a cancellation of the caller (after `work` is cancelled).
    """
    task = asyncio.ensure_future(work)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            await cancel_and_wait(task)
        await cancel_and_wait(stopped)
    if task.cancelled():
        return False
    task.result()
    return True


async def _shutdown(settings: WorkerSettings, service: GrpcService, admission: Admission,
                    registration: WorkerRegistration, roles: Sequence[WorkerRole], engine: Engine) -> int:
    """Finishes accepted work, then leaves: never drops a request that was accepted."""
    admission.start_draining()
    try:
        await registration.set_state(registry_pb2.WORKER_STATE_DRAINING)
    except Exception:
        log.warning("could not mark the worker DRAINING in etcd")
    finished = await admission.wait_idle(settings.shutdown_grace)
    if not finished:
        log.warning("shutdown grace over with requests in flight", extra={"in_flight": admission.in_flight})
    await registration.close()
    await service.stop(grace=1.0)
    for role in roles:
        await role.close()
    await engine.close()
    log.info("worker stopped")
    return 0


def main_for(start_role: Role, prog: str, section: str, argv: Sequence[str] | None = None) -> int:
    """Console-script entry: parse settings, configure logs, run (starting in `start_role`) until stopped."""
    from runtime.config import ConfigError, load_config
    from runtime.logs import configure_logging

    try:
        settings = load_config(WorkerSettings, argv, prog=prog, section=section,
                               description=f"Tandem {section} worker")
        run = loop_runner(settings.event_loop)
    except (ConfigError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    configure_logging(prog, settings.log_level, settings.log_format)
    return run(run_worker(settings, start_role))
