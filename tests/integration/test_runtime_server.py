"""The shared server lifecycle: health, reflection, metrics, graceful stop."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from runtime.metrics import MetricsEndpoint
from runtime.server import GrpcService

pytestmark = pytest.mark.integration

SERVICE = "tandem.v1.Worker"


async def test_health_reflection_and_stop() -> None:
    service = GrpcService("127.0.0.1:0", service_names=[SERVICE])
    port = await service.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 5)
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=2)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = [s.name async for r in replies for s in r.list_services_response.service]
            assert SERVICE in names and "grpc.health.v1.Health" in names

            await service.set_serving(False)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await service.stop(grace=1)
        await service.stop(grace=1)  # idempotent


async def test_port_in_use_is_a_clear_error() -> None:
    first = GrpcService("127.0.0.1:0", service_names=[])
    port = await first.start()
    try:
        second = GrpcService(f"127.0.0.1:{port}", service_names=[],
                             options=(("grpc.so_reuseport", 0),))
        with pytest.raises(OSError, match="cannot listen"):
            await second.start()
    finally:
        await first.stop(grace=0)


def test_metrics_endpoint_serves_text_format() -> None:
    endpoint = MetricsEndpoint("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert "python_info" in body or "process_" in body
    finally:
        endpoint.close()
