"""tandem-router: the public Inference API. `python -m router_svc --help` lists the settings.

The settings are declared in router_svc/settings.py (RouterSettings, re-exported here).
With `--processes N` (N > 1, or 0 with several cores) this process supervises N routers
sharing its ports instead of serving itself (router_svc/processes.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from collections.abc import Sequence

from registry.etcd_client import EtcdClient
from registry.keys import Kind
from router_svc.demand_publisher import DemandPublisher
from router_svc.demand_window import DemandWindow
from router_svc.http_api.keys import ApiKeys, KeyFileError
from router_svc.http_api.server import HttpFront, server_ssl_context
from router_svc.inference import InferenceCore
from router_svc.live_view import LiveView
from router_svc.metrics import RouterMetrics
from router_svc.models import ModelCatalog, parse_tokenizer_map
from router_svc.pipeline import Pipeline, PipelineConfig
from router_svc.policies import create_policy
from router_svc.policy import PolicyConfig
from router_svc.processes import child_router_ids, process_count, supervise
from router_svc.servicer import InferenceServicer
from router_svc.settings import RouterSettings
from runtime.channels import ChannelPool
from runtime.config import ConfigError, load_config
from runtime.event_loop import loop_runner, running_loop_name
from runtime.logs import configure_logging
from runtime.metrics import MetricsEndpoint
from runtime.server import (
    DEFAULT_OPTIONS,
    GrpcService,
    TlsFiles,
    advertised_endpoint,
    announce_ready,
    install_stop_signals,
)
from tandem.v1 import inference_pb2_grpc

log = logging.getLogger("router_svc")

__all__ = ["RouterSettings", "main", "serve"]


def _http_front(settings: RouterSettings, core: InferenceCore, metrics: RouterMetrics,
                tls: TlsFiles | None) -> HttpFront:
    """The OpenAI-compatible HTTP API: TLS with the gRPC port's certificate, when it has one."""
    context = server_ssl_context(str(tls.cert), str(tls.key), str(tls.client_ca) if tls.client_ca else None) \
        if tls is not None else None
    return HttpFront(core, metrics, ApiKeys(settings.http_api_keys_file, settings.http_api_keys),
                     ssl_context=context, shutdown_grace=settings.shutdown_grace)


def _grpc_options(reuse_port: bool) -> tuple[tuple[str, int], ...]:
    """The shared server options; SO_REUSEPORT only when asked (by default a taken port is an error)."""
    if not reuse_port:
        return DEFAULT_OPTIONS
    return (*(option for option in DEFAULT_OPTIONS if option[0] != "grpc.so_reuseport"), ("grpc.so_reuseport", 1))


async def serve(settings: RouterSettings) -> int:
    metrics_endpoint = MetricsEndpoint(settings.metrics_listen) if settings.metrics_listen else None
    client = EtcdClient(settings.etcd_settings())
    await client.connect()
    tls = settings.peer_tls()
    channels = ChannelPool(tls)
    view = LiveView(client, settings.keys(), channels)
    # A system-seeded rng: router replicas must not all break ties the same way.
    policy = create_policy(settings.policy, rng=random.Random(), config=PolicyConfig(
        local_prefill_max_prompt_tokens=settings.local_prefill_max_prompt_tokens,
        prefill_queue_limit_tokens=settings.prefill_queue_limit_tokens))
    pipeline = Pipeline(view, policy, channels, PipelineConfig(
        capacity_wait_s=settings.capacity_wait_s, max_attempts=settings.max_attempts,
        stall_timeout_s=settings.stall_timeout_s, suspect_s=settings.suspect_s,
        kv_transports=settings.transports()))
    catalog = ModelCatalog(parse_tokenizer_map(settings.tokenizer), default_max_tokens=settings.default_max_tokens,
                           default_max_output_tokens=settings.max_output_tokens)
    server_tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca) \
        if settings.tls_cert and settings.tls_key else None
    service = GrpcService(settings.listen, service_names=["tandem.v1.Inference"], tls=server_tls,
                          options=_grpc_options(settings.reuse_port))
    metrics = RouterMetrics()
    demand = DemandWindow(settings.demand_window_s)
    core = InferenceCore(view, pipeline, catalog, metrics, demand, stream_interval_ms=settings.stream_interval_ms)
    publisher = DemandPublisher(
        client, settings.keys(), settings.resolved_router_id(), demand,
        lambda: {name: entry.record.slo for name, entry in view.registry.entries(Kind.MODEL).items()},
        interval_s=settings.demand_interval_s, lease_ttl=settings.lease_ttl)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(core), service.server)
    http = _http_front(settings, core, metrics, server_tls) if settings.http_listen else None
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        await view.start()
        publisher.start()
        # Serve at once: requests wait (bounded) for workers; the view fills as etcd answers.
        await view.registry.wait_synced(timeout=settings.etcd_timeout)
        port = await service.start()
        http_port = 0 if http is None else await http.start(settings.http_listen, reuse_port=settings.reuse_port)
        endpoint = advertised_endpoint(settings.listen, port, settings.advertise_host)
        announce_ready(settings.ready_file, endpoint=endpoint, pid=os.getpid(),
                       metrics_port=metrics_endpoint.port if metrics_endpoint else 0, http_port=http_port)
        log.info("router ready", extra={"endpoint": endpoint, "policy": policy.name, "http_port": http_port,
                                        "event_loop": running_loop_name()})
        await stop.wait()
    finally:
        if metrics_endpoint is not None:
            metrics_endpoint.draining()  # /healthz says so while in-flight streams finish
        await service.set_serving(False)
        # Both fronts stop accepting at once; their requests in flight share the one grace.
        await asyncio.gather(service.stop(grace=settings.shutdown_grace),
                             *([http.stop()] if http is not None else []))
        await publisher.close()
        await view.close()
        await channels.close()
        await client.close()
        if metrics_endpoint is not None:
            metrics_endpoint.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_config(RouterSettings, argv, prog="tandem-router", section="router",
                               description="Tandem router: the public Inference API")
        parse_tokenizer_map(settings.tokenizer)
        settings.peer_tls()
        processes = process_count(settings.processes, len(os.sched_getaffinity(0)))
        child_router_ids(settings.resolved_router_id(), processes if processes > 1 else 0)
        ApiKeys(settings.http_api_keys_file, settings.http_api_keys)  # a missing or empty key file: refuse to start
        run = loop_runner(settings.event_loop)
    except (ConfigError, ValueError, KeyFileError) as exc:
        print(f"tandem-router: {exc}", file=sys.stderr)
        return 2
    configure_logging("tandem-router", settings.log_level, settings.log_format)
    if processes > 1:
        return supervise(settings, sys.argv[1:] if argv is None else argv, processes)
    return run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
