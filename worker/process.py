"""The life of a worker process, shared by prefill and decode.

    start gRPC (health NOT_SERVING) -> register STARTING -> claim GPUs
    -> load the engine -> register READY, health SERVING, ready file
    -> serve ... SIGTERM/SIGINT or drain intent ...
    -> stop admitting (UNAVAILABLE), state DRAINING, finish in-flight work
    -> revoke the lease (record and claims vanish) -> stop gRPC -> close engine

GPUs are claimed before the model loads: a worker pointed at GPUs another
worker holds exits at once with EXIT_GPU_CLAIMED (the systemd units do not
restart on it) instead of loading weights onto a busy GPU first. The claim
waits for etcd as long as it takes; SIGTERM/SIGINT ends that wait.

A drain intent (tandemctl drain) runs the same drain but keeps the process
up and deregistered; removing the intent registers it again.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import grpc

from engine.base import Engine, EngineError, create_engine
from registry.claims import GpuAlreadyClaimed
from runtime import __version__ as tandem_version
from runtime.metrics import MetricsEndpoint
from runtime.sampling import Sampling, check_model, check_prompt, sampling_from_proto
from runtime.server import GrpcService, TlsFiles, advertised_endpoint, announce_ready, install_stop_signals
from runtime.tasks import cancel_and_wait
from tandem.v1 import common_pb2, registry_pb2, worker_pb2, worker_pb2_grpc
from worker.admission import Admission
from worker.load import LoadReporter, WorkerLoadServicer
from worker.metrics import WorkerMetrics
from worker.registration import WorkerRegistration, model_shape_to_pb
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Exit statuses. The worker units list the ones a restart cannot fix in
# RestartPreventExitStatus= (tests/integration/test_systemd_units.py checks it).
EXIT_BAD_SETTINGS = 2
EXIT_ENGINE_FAILED = 3
EXIT_GPU_CLAIMED = 4
NO_RESTART_EXIT_STATUSES = (EXIT_BAD_SETTINGS, EXIT_GPU_CLAIMED)


@dataclass
class WorkerContext:
    """What a role's servicers get: the engine, admission, identity."""

    settings: WorkerSettings
    role: common_pb2.Role.ValueType
    worker_id: str
    node: str
    host: str
    engine: Engine
    admission: Admission
    metrics: WorkerMetrics

    def check_request(self, request: worker_pb2.PrefillRequest | worker_pb2.DecodeRequest
                      ) -> tuple[Sampling, tuple[int, ...]]:
        """A Prefill or Decode request's sampling and prompt, checked against this worker's model
        (runtime.sampling's rules, the router's too); InvalidRequest names the field."""
        engine = self.engine
        check_model(engine.model_name, request.model)
        sampling = sampling_from_proto(request.sampling, max_output_tokens=engine.max_context_tokens)
        prompt = check_prompt(request.prompt_token_ids, vocab_size=engine.tokenizer.vocab_size,
                              max_context_tokens=engine.max_context_tokens, max_tokens=sampling.max_tokens,
                              model=engine.model_name)
        return sampling, prompt


class WorkerRole(abc.ABC):
    """A prefill or decode role: its servicers and its part of the load report."""

    role: common_pb2.Role.ValueType
    role_name: str
    service_names: Sequence[str]

    @abc.abstractmethod
    def mount(self, ctx: WorkerContext, server: grpc.aio.Server) -> None:
        """Adds the role's servicers to `server` (called once, before start)."""

    async def started(self, endpoint: str) -> None:  # noqa: B027 - optional hook
        """Called once the gRPC server is bound, with the endpoint others dial."""

    def fill_load(self, report: worker_pb2.LoadReport) -> None:  # noqa: B027 - optional hook
        """Adds role-specific counters to a load report (default: nothing)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Frees the role's resources (KV handles...). Safe to call twice."""


def _load_snapshot(ctx: WorkerContext, role: WorkerRole) -> worker_pb2.LoadReport:
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
        draining=ctx.admission.draining,
        max_batch_size=stats.max_batch_size,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
    )
    role.fill_load(report)
    return report


async def run_worker(settings: WorkerSettings, role: WorkerRole) -> int:
    """Runs a worker until SIGTERM/SIGINT; returns the process exit status."""
    worker_id = settings.resolved_worker_id(role.role_name)
    node = settings.resolved_node()
    metrics = MetricsEndpoint(settings.metrics_listen) if settings.metrics_listen else None
    engine = create_engine(settings.engine, settings.engine_config())
    admission = Admission(worker_id, settings.max_queued_requests, settings.max_requests_per_peer)
    tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca) \
        if settings.tls_cert and settings.tls_key else None
    service = GrpcService(settings.listen, service_names=[*role.service_names, "tandem.v1.Worker"], tls=tls)
    host = settings.advertise_host or socket.gethostname()
    ctx = WorkerContext(settings, role.role, worker_id, node, host, engine, admission,
                        WorkerMetrics(role.role_name, worker_id, lambda: _load_snapshot(ctx, role),
                                      model=engine.model_name))
    role.mount(ctx, service.server)
    worker_pb2_grpc.add_WorkerServicer_to_server(
        WorkerLoadServicer(LoadReporter(lambda: _load_snapshot(ctx, role), engine.kv_events),
                           min_interval_ms=settings.min_load_interval_ms,
                           max_watchers=settings.max_load_watchers), service.server)

    stop = asyncio.Event()
    install_stop_signals(stop)
    port = await service.start(serving=False)
    endpoint = advertised_endpoint(settings.listen, port, settings.advertise_host)
    await role.started(endpoint)
    record = _starting_record(settings, role, worker_id, node, endpoint, host, metrics)

    async def on_drain(wanted: bool) -> None:
        if wanted:
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

    registration = WorkerRegistration(settings, record, on_drain)
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
        if not admission.draining:
            await registration.set_state(registry_pb2.WORKER_STATE_READY)
            await service.set_serving(True)
        announce_ready(settings.ready_file, endpoint=endpoint, worker_id=worker_id, pid=os.getpid(),
                       metrics_port=metrics.port if metrics else 0)
        log.info("worker ready", extra={"worker_id": worker_id, "endpoint": endpoint})
        await stop.wait()
    finally:
        if metrics is not None:
            metrics.draining()
        status = await _shutdown(settings, service, admission, registration, role, engine)
        if metrics is not None:
            metrics.close()
    return status


def _starting_record(settings: WorkerSettings, role: WorkerRole, worker_id: str, node: str, endpoint: str,
                     host: str, metrics: MetricsEndpoint | None) -> registry_pb2.WorkerRecord:
    """The record a worker registers before its GPUs are claimed and its model is loaded (STARTING)."""
    return registry_pb2.WorkerRecord(
        worker_id=worker_id, role=role.role, model=settings.served_model_name or settings.model,
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
                    registration: WorkerRegistration, role: WorkerRole, engine: Engine) -> int:
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
    await role.close()
    await engine.close()
    log.info("worker stopped")
    return 0


def main_for(role: WorkerRole, prog: str, section: str, argv: Sequence[str] | None = None) -> int:
    """Console-script entry: parse settings, configure logs, run until stopped."""
    from runtime.config import ConfigError, load_config
    from runtime.logs import configure_logging

    try:
        settings = load_config(WorkerSettings, argv, prog=prog, section=section,
                               description=f"Tandem {section} worker")
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    configure_logging(prog, settings.log_level, settings.log_format)
    return asyncio.run(run_worker(settings, role))
