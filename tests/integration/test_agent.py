"""tandem-agent as a real process against a real etcd: registration, lease-bound removal, no-driver note."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.etcd_server import EtcdServer
from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys, Kind
from registry.store import Registry
from runtime.catalog import default_catalog
from tandem.v1 import registry_pb2

pytestmark = pytest.mark.integration

TTL = 2


@pytest.fixture
async def registry(etcd: EtcdServer) -> AsyncIterator[Registry]:
    async with EtcdClient(EtcdSettings.parse(etcd.endpoint, timeout=1.0)) as client:
        yield Registry(client, Keys())


def start_agent(processes: object, etcd_endpoint: str, node: str, *args: str) -> ManagedProcess:
    return processes.start(f"agent-{node}", "controlplane.agent", "--etcd", etcd_endpoint,  # type: ignore[attr-defined]
                           "--node", node, "--lease-ttl", str(TTL), "--log-format", "json", *args)


async def node_record(registry: Registry, node: str) -> registry_pb2.NodeRecord | None:
    entry = await registry.get(Kind.NODE, node)
    return entry.record if entry is not None else None


async def wait_gone(registry: Registry, node: str, timeout: float) -> float:
    """Seconds until the node's key is gone; fails after `timeout`."""
    start = time.monotonic()
    while await node_record(registry, node) is not None:
        assert time.monotonic() - start < timeout, f"node {node} still registered after {timeout}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


async def test_simulated_node_registers_and_sigterm_removes_it_at_once(processes: object, etcd: EtcdServer,
                                                                       registry: Registry) -> None:
    agent = start_agent(processes, etcd.endpoint, "gpu-1", "--simulate-gpus", "H100-SXM:2,L4:1",
                        "--labels", "rack=r1", "--metrics-listen", "127.0.0.1:0")
    assert agent.info["registered"] is True and agent.info["gpus"] == 3
    # Ready means registered: the record is in etcd already, no polling needed.
    record = await node_record(registry, "gpu-1")
    assert record is not None
    assert record.simulated and record.labels == {"rack": "r1"} and record.inventory_note == ""
    assert [(g.index, g.uuid, g.catalog_id) for g in record.gpus] == [
        (0, "SIM-gpu-1-0", "H100-SXM"), (1, "SIM-gpu-1-1", "H100-SXM"), (2, "SIM-gpu-1-2", "L4")]
    assert all(g.health == registry_pb2.GPU_HEALTH_OK for g in record.gpus)
    assert record.agent_version and record.started_at_unix_ms > 0

    metrics = await asyncio.to_thread(scrape, f"http://{agent.info['metrics_endpoint']}/metrics")
    assert 'tandem_gpu_memory_total_bytes{catalog_id="L4",gpu="2",node="gpu-1",uuid="SIM-gpu-1-2"} 2.4e+10' in metrics
    assert 'tandem_gpu_health{catalog_id="H100-SXM",gpu="0",node="gpu-1",uuid="SIM-gpu-1-0"} 1.0' in metrics
    assert "tandem_gpu_power_watts{" not in metrics  # simulated GPUs have no power reading, not a 0

    agent.send(signal.SIGTERM)
    assert agent.process is not None and agent.process.wait(15) == 0
    assert await node_record(registry, "gpu-1") is None  # lease revoked before exit, not left to expire


async def test_killed_agent_disappears_within_the_lease_ttl(processes: object, etcd: EtcdServer,
                                                            registry: Registry) -> None:
    agent = start_agent(processes, etcd.endpoint, "gpu-2", "--simulate-gpus", "A100-80GB:1")
    assert await node_record(registry, "gpu-2") is not None
    agent.kill()
    # etcd expires a lease within about TTL + its 0.5 s check interval; the slack is for a loaded machine.
    await wait_gone(registry, "gpu-2", timeout=TTL + 4)


async def test_without_a_driver_the_node_registers_with_no_gpus_and_one_note(processes: object, etcd: EtcdServer,
                                                                            registry: Registry) -> None:
    agent = start_agent(processes, etcd.endpoint, "cpu-1", "--refresh-interval", "0.1", "--log-level", "debug")
    record = await node_record(registry, "cpu-1")
    assert record is not None and not record.simulated and len(record.gpus) == 0
    assert record.inventory_note.endswith("reporting no GPUs.")
    # Several refreshes later the note is still logged once (and the record not rewritten: nothing changed).
    log = Path(agent.log_path)
    deadline = time.monotonic() + 30
    while (await asyncio.to_thread(log.read_text)).count('"msg": "inventory read"') < 5:
        assert time.monotonic() < deadline, agent.log_tail()
        await asyncio.sleep(0.05)
    text = await asyncio.to_thread(log.read_text)
    assert text.count(record.inventory_note) == 1, text
    assert text.count('"write": "first"') == 1 and '"write": "changed"' not in text
    assert agent.info["gpus"] == 0 and agent.info["registered"] is True


async def test_agent_with_etcd_down_is_ready_with_registration_pending(processes: object, tmp_path: Path) -> None:
    agent = start_agent(processes, "127.0.0.1:1", "lonely", "--simulate-gpus", "L4:1", "--etcd-timeout", "0.5")
    assert agent.info["registered"] is False and agent.info["gpus"] == 1
    assert "node registration is pending" in agent.log_tail()
    agent.send(signal.SIGTERM)
    assert agent.process is not None and agent.process.wait(15) == 0


def test_bad_flags_exit_2_with_one_line_naming_the_flag(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "controlplane.agent", "--simulate-gpus", "H100:4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    known = ", ".join(default_catalog().ids())
    assert result.stderr.strip().splitlines() == [
        f"tandem-agent: --simulate-gpus: unknown GPU type 'H100'; known: {known}"]
