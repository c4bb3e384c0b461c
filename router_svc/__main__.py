"""tandem-router: the public Inference API. `python -m router_svc --help` lists the settings."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from registry.etcd_client import EtcdClient
from registry.settings import CommonSettings
from router_svc.live_view import LiveView
from router_svc.metrics import RouterMetrics
from router_svc.models import ModelCatalog, parse_tokenizer_map
from router_svc.pipeline import Pipeline, PipelineConfig
from router_svc.policy import DEFAULT_POLICY, PolicyConfig, create_policy
from router_svc.servicer import InferenceServicer
from runtime.channels import ChannelPool
from runtime.config import ConfigError, load_config
from runtime.logs import configure_logging
from runtime.metrics import MetricsEndpoint
from runtime.server import GrpcService, TlsFiles, advertised_endpoint, announce_ready, install_stop_signals
from tandem.v1 import inference_pb2_grpc

log = logging.getLogger("router_svc")


@dataclass
class RouterSettings(CommonSettings):
    listen: str = field(default="0.0.0.0:50051", metadata={"help": "gRPC listen address for clients"})
    advertise_host: str = field(default="", metadata={"help": "host clients use to reach this router"})
    policy: str = field(default=DEFAULT_POLICY, metadata={
        "help": "routing policy: expected-time, least-loaded, round-robin, random"})
    local_prefill_max_prompt_tokens: int = field(default=256, metadata={
        "help": "prompts up to this many tokens are prefilled on the decode worker"})
    prefill_queue_limit_tokens: int = field(default=65536, metadata={
        "help": "a prefill worker with more queued tokens is saturated (prefill locally instead)"})
    capacity_wait_s: float = field(default=5.0, metadata={
        "help": "seconds a request waits for a free worker before RESOURCE_EXHAUSTED / UNAVAILABLE"})
    max_attempts: int = field(default=8, metadata={"help": "worker calls one request may make"})
    stall_timeout_s: float = field(default=30.0, metadata={
        "help": "a decode stream silent this long is treated as dead and migrated"})
    suspect_s: float = field(default=5.0, metadata={"help": "seconds a failed worker is avoided by all requests"})
    kv_transports: str = field(default="shm,tcp,grpc", metadata={"help": "KV transports to ask for, best first"})
    tokenizer: str = field(default="", metadata={"help": "MODEL=PATH[,MODEL=PATH...]: tokenizer directories"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request sets none"})
    max_output_tokens: int = field(default=4096, metadata={"help": "max_tokens limit when a model spec sets none"})
    tls_cert: Path | None = field(default=None, metadata={"help": "serve TLS with this certificate"})
    tls_key: Path | None = field(default=None, metadata={"help": "private key of --tls-cert"})
    tls_client_ca: Path | None = field(default=None, metadata={"help": "require client certificates from this CA"})


async def serve(settings: RouterSettings) -> int:
    metrics_endpoint = MetricsEndpoint(settings.metrics_listen) if settings.metrics_listen else None
    client = EtcdClient(settings.etcd_settings())
    await client.connect()
    tls = settings.peer_tls()
    channels = ChannelPool(tls)
    view = LiveView(client, settings.keys(), channels)
    policy = create_policy(settings.policy, config=PolicyConfig(
        local_prefill_max_prompt_tokens=settings.local_prefill_max_prompt_tokens,
        prefill_queue_limit_tokens=settings.prefill_queue_limit_tokens))
    pipeline = Pipeline(view, policy, channels, PipelineConfig(
        capacity_wait_s=settings.capacity_wait_s, max_attempts=settings.max_attempts,
        stall_timeout_s=settings.stall_timeout_s, suspect_s=settings.suspect_s,
        kv_transports=kv_transports(settings.kv_transports, tls_to_workers=tls is not None)))
    catalog = ModelCatalog(parse_tokenizer_map(settings.tokenizer), default_max_tokens=settings.default_max_tokens,
                           default_max_output_tokens=settings.max_output_tokens)
    server_tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca) \
        if settings.tls_cert and settings.tls_key else None
    service = GrpcService(settings.listen, service_names=["tandem.v1.Inference"], tls=server_tls)
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceServicer(view, pipeline, catalog, RouterMetrics()), service.server)
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        await view.start()
        # Serve at once: requests wait (bounded) for workers; the view fills as etcd answers.
        await view.registry.wait_synced(timeout=settings.etcd_timeout)
        port = await service.start()
        endpoint = advertised_endpoint(settings.listen, port, settings.advertise_host)
        announce_ready(settings.ready_file, endpoint=endpoint, pid=os.getpid(),
                       metrics_port=metrics_endpoint.port if metrics_endpoint else 0)
        log.info("router ready", extra={"endpoint": endpoint, "policy": policy.name})
        await stop.wait()
    finally:
        await service.set_serving(False)
        await service.stop(grace=settings.shutdown_grace)
        await view.close()
        await channels.close()
        await client.close()
        if metrics_endpoint is not None:
            metrics_endpoint.close()
    return 0


def kv_transports(setting: str, *, tls_to_workers: bool) -> tuple[str, ...]:
    """The KV transports to ask prefill workers for. With TLS between services the raw `tcp` data
    socket (plaintext) is left out: KV moves over the TLS gRPC stream, or shared memory on one host."""
    names = tuple(t.strip() for t in setting.split(",") if t.strip())
    return tuple(t for t in names if t != "tcp") if tls_to_workers else names


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_config(RouterSettings, argv, prog="tandem-router", section="router",
                               description="Tandem router: the public Inference API")
        parse_tokenizer_map(settings.tokenizer)
        settings.peer_tls()
    except (ConfigError, ValueError) as exc:
        print(f"tandem-router: {exc}", file=sys.stderr)
        return 2
    configure_logging("tandem-router", settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
