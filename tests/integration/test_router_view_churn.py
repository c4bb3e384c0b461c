"""The router's view under bulk registration churn: records written and deleted by the hundred.

A fleet registering at once (or records forged in bulk) must not cost the
router a WatchLoad stream and a channel per STARTING record, and must leave
nothing behind once the records go: the router's own gauges
(tandem_router_view_workers, tandem_router_load_streams) say what it holds.
"""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest

from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys
from registry.records import encode
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2
from tests.support.metrics_fleet import get

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
BULK = 300


def _gauge(port: int, name: str) -> float:
    status, text = get(port, "/metrics")
    assert status == 200
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} missing from the router's metrics"
    return float(found.group(1))


async def _until(port: int, name: str, value: float, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (seen := await asyncio.to_thread(_gauge, port, name)) != value:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} is {seen}, waited for {value}")
        await asyncio.sleep(0.05)


def _record(i: int, state: int) -> bytes:
    return encode(registry_pb2.WorkerRecord(
        worker_id=f"bulk-{i:04d}", role=common_pb2.ROLE_DECODE, model=MODEL, endpoint=f"127.0.0.1:{1 + i}",
        node=f"bulk-node-{i}", gpu_type="H100-SXM", gpu_count=1, engine="sim", simulated=True, state=state))


async def test_bulk_records_cost_no_streams_until_ready_and_leave_nothing_behind(etcd, processes) -> None:
    common = ("--etcd", etcd.endpoint, "--lease-ttl", "2", "--metrics-listen", "127.0.0.1:0")
    processes.start("d0", "decode_svc", *common, "--engine", "sim", "--model", MODEL, "--gpu-type", "H100-SXM",
                    "--speedup", "1000", "--listen", "127.0.0.1:0", "--worker-id", "d0", "--node", "n0")
    router = processes.start("router", "router_svc", *common, "--listen", "127.0.0.1:0")
    port = router.info["metrics_port"]
    await _until(port, "tandem_router_view_workers", 1)
    await _until(port, "tandem_router_load_streams", 1)

    keys = Keys()
    async with EtcdClient(EtcdSettings.parse(etcd.endpoint, timeout=30.0)) as client:
        lease, _ = await client.grant(600)
        await asyncio.gather(*(client.put(keys.worker(f"bulk-{i:04d}"), _record(i, registry_pb2.WORKER_STATE_STARTING),
                                          lease=lease) for i in range(BULK)))
        await _until(port, "tandem_router_view_workers", BULK + 1)
        assert await asyncio.to_thread(_gauge, port, "tandem_router_load_streams") == 1

        # Ten of them become READY: those, and only those, are followed.
        await asyncio.gather(*(client.put(keys.worker(f"bulk-{i:04d}"), _record(i, registry_pb2.WORKER_STATE_READY),
                                          lease=lease) for i in range(10)))
        await _until(port, "tandem_router_load_streams", 11)

        await client.revoke(lease, timeout=30)
        await _until(port, "tandem_router_view_workers", 1)
        await _until(port, "tandem_router_load_streams", 1)

    # The real worker still serves through the router.
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        reply = await inference_pb2_grpc.InferenceStub(channel).Complete(inference_pb2.GenerateRequest(
            model=MODEL, prompt_token_ids=[5, 6, 7], sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=30)
    assert len(reply.token_ids) == 4 and reply.route.decode_worker_id == "d0"
