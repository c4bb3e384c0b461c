"""A worker publishes the GPU type of the GPUs it claimed, as its node agent's inventory names them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from controlplane.etcd_server import EtcdServer
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys, Kind
from registry.store import Registry
from tandem.v1 import registry_pb2

pytestmark = pytest.mark.integration

NODE = "gpu-node"


@pytest.fixture
async def registry(etcd: EtcdServer) -> AsyncIterator[Registry]:
    async with EtcdClient(EtcdSettings.parse(etcd.endpoint, timeout=1.0)) as client:
        yield Registry(client, Keys())


async def ready_record(registry: Registry, worker_id: str) -> registry_pb2.WorkerRecord:
    deadline = time.monotonic() + 30
    while True:
        entry = await registry.get(Kind.WORKER, worker_id)
        if entry is not None and entry.record.state == registry_pb2.WORKER_STATE_READY:
            return entry.record
        assert time.monotonic() < deadline, f"{worker_id} never READY: {entry}"
        await asyncio.sleep(0.05)


async def test_the_inventory_not_the_flag_names_the_gpus(processes: object, etcd: EtcdServer,
                                                         registry: Registry) -> None:
    common = ("--etcd", etcd.endpoint, "--lease-ttl", "2", "--log-format", "text")
    processes.start("agent", "controlplane.agent", *common, "--node", NODE,  # type: ignore[attr-defined]
                    "--simulate-gpus", "A100-80GB:2,L4:1")
    deadline = time.monotonic() + 30
    while (node := await registry.get(Kind.NODE, NODE)) is None:
        assert time.monotonic() < deadline, "the agent never registered its node"
        await asyncio.sleep(0.05)
    a100s = [gpu.uuid for gpu in node.record.gpus if gpu.catalog_id == "A100-80GB"]
    assert len(a100s) == 2
    # --gpu-type says H100 (a copy-paste from another host): the claimed GPUs are A100s, and that is published.
    processes.start("d0", "decode_svc", *common, "--listen", "127.0.0.1:0", "--node", NODE,  # type: ignore[attr-defined]
                    "--worker-id", "d0", "--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM",
                    "--gpu-uuids", ",".join(a100s), "--speedup", "1000")
    record = await ready_record(registry, "d0")
    assert (record.gpu_type, record.gpu_count) == ("A100-80GB", 2)
