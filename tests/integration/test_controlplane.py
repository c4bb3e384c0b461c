"""The control-plane server as a real process against a real etcd: health verdicts,
Admin auth and validation, fleet counts, leases.

Workers here are real grpc.aio health servers in the test process, registered
in etcd through a LeaseSession, as a worker service would.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.etcd_server import EtcdServer
from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys
from registry.session import LeaseSession
from registry.store import Registry
from runtime.server import GrpcService
from tandem.v1 import admin_pb2, admin_pb2_grpc, common_pb2, registry_pb2

pytestmark = pytest.mark.integration

KEYS = Keys()
TTL = 2
# Fast rounds so the thresholds are crossed in well under a second.
FAST_PROBES = ("--probe-interval", "0.1", "--probe-timeout", "0.5", "--failure-threshold", "2",
               "--success-threshold", "2")


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(EtcdSettings.parse(etcd.endpoint, timeout=1.0)) as c:
        yield c


def start_replica(processes: Any, etcd: EtcdServer, name: str, *args: str) -> ManagedProcess:
    """`python -m controlplane.server` as replica `name`, waited for until SERVING."""
    return processes.start(name, "controlplane.server", "--etcd", etcd.endpoint, "--listen", "127.0.0.1:0",
                           "--replica-id", name, "--lease-ttl", str(TTL), "--log-format", "text",
                           "--shutdown-grace", "2", *FAST_PROBES, *args)


@asynccontextmanager
async def admin(endpoint: str) -> AsyncIterator[admin_pb2_grpc.AdminStub]:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


async def wait_until(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls `probe()` (sync or async) until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
            if inspect.isawaitable(last):
                last = await last
        except grpc.aio.AioRpcError as exc:
            last = exc
        else:
            if last:
                return last
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s (last: {last!r})"
        await asyncio.sleep(0.05)


class FakeWorker:
    """A real grpc.health.v1 server, registered as a worker under its own lease."""

    def __init__(self, client: EtcdClient, worker_id: str, *, role: common_pb2.Role.ValueType = common_pb2.ROLE_DECODE,
                 node: str = "n1", gpus: tuple[str, ...] = (), endpoint: str = "") -> None:
        self.registry = Registry(client, KEYS)
        self.session = LeaseSession(client, ttl=TTL, name=worker_id)
        self.service = GrpcService("127.0.0.1:0", service_names=[])
        self.record = registry_pb2.WorkerRecord(worker_id=worker_id, role=role, model="m", node=node,
                                                gpu_uuids=list(gpus), gpu_type="", engine="sim", simulated=True,
                                                state=registry_pb2.WORKER_STATE_READY, endpoint=endpoint)

    async def start(self) -> FakeWorker:
        port = await self.service.start()
        self.record.endpoint = self.record.endpoint or f"127.0.0.1:{port}"
        self.session.start()
        assert await self.session.wait_alive(10)
        await self.registry.register_worker(self.session, self.record)
        if self.record.gpu_uuids:
            await self.registry.claim_gpus(self.session, self.record.worker_id, self.record.role, self.record.node,
                                           list(self.record.gpu_uuids))
        return self

    async def close(self) -> None:
        await self.session.close()
        await self.service.stop(grace=0)


@asynccontextmanager
async def workers(*items: FakeWorker) -> AsyncIterator[list[FakeWorker]]:
    try:
        for item in items:
            await item.start()
        yield list(items)
    finally:
        for item in items:
            await item.close()


async def worker_status(stub: admin_pb2_grpc.AdminStub, worker_id: str) -> admin_pb2.WorkerStatus | None:
    reply = await stub.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=2)
    return next((w for w in reply.workers if w.record.worker_id == worker_id), None)


def verdict_is(stub: admin_pb2_grpc.AdminStub, worker_id: str, status: int, prober: str = "") -> Callable[[], Any]:
    async def check() -> admin_pb2.WorkerStatus | None:
        row = await worker_status(stub, worker_id)
        if row is None or not row.HasField("health") or row.health.status != status:
            return None
        return row if not prober or row.health.prober == prober else None
    return check


async def test_leader_marks_a_not_serving_worker_and_back(etcd: EtcdServer, client: EtcdClient,
                                                          processes: Any) -> None:
    replica = start_replica(processes, etcd, "cp-1")
    async with workers(FakeWorker(client, "w1")) as (worker,), admin(replica.endpoint) as stub:
        row = await wait_until(verdict_is(stub, "w1", registry_pb2.SERVING_STATUS_SERVING, "cp-1"), 10, "SERVING")
        assert row.routable

        await worker.service.set_serving(False)
        row = await wait_until(verdict_is(stub, "w1", registry_pb2.SERVING_STATUS_NOT_SERVING), 10, "NOT_SERVING")
        assert row.health.reason == "2 probes failed: NOT_SERVING"
        assert not row.routable
        fleet = await stub.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2)
        assert fleet.workers_not_serving == 1 and fleet.leader.replica_id == "cp-1"

        await worker.service.set_serving(True)
        row = await wait_until(verdict_is(stub, "w1", registry_pb2.SERVING_STATUS_SERVING), 10, "SERVING again")
        assert row.health.reason == "2 probes answered SERVING" and row.routable

        # A worker that leaves takes its verdict with it.
        await worker.session.close()
        await wait_until(lambda: _no_verdict(client, "w1"), 10, "verdict of a departed worker removed")


async def _no_verdict(client: EtcdClient, worker_id: str) -> bool:
    return await client.get(KEYS.health(worker_id)) is None


async def test_admin_mutations_need_the_token_and_validate(etcd: EtcdServer, client: EtcdClient, processes: Any,
                                                           tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-token\n")
    replica = start_replica(processes, etcd, "cp-auth", "--admin-token-file", str(token_file))
    good = (("authorization", "Bearer s3cret-token"), ("tandem-requested-by", "alice"))
    async with workers(FakeWorker(client, "w1", node="rack-1")), admin(replica.endpoint) as stub:
        drain = admin_pb2.DrainWorkerRequest(worker_id="w1", reason="kernel update")
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.DrainWorker(drain, metadata=metadata, timeout=2)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await client.get(KEYS.drain("w1")) is None
        # Reads stay open.
        await wait_until(lambda: worker_status(stub, "w1"), 10, "worker listed")

        reply = await stub.DrainWorker(drain, metadata=good, timeout=2)
        assert reply.intent.requested_by == "alice" and reply.intent.reason == "kernel update"
        again = await stub.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="w1"), metadata=good, timeout=2)
        assert again.intent == reply.intent  # idempotent: the first intent stands
        row = await wait_until(lambda: _drained(stub, "w1"), 10, "drain visible")
        assert not row.routable and row.drain.reason == "kernel update"

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="ghost"), metadata=good, timeout=2)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "'ghost'" in (missing.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="no spaces"), metadata=good, timeout=2)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "worker_id" in (bad.value.details() or "")

        undrain = admin_pb2.UndrainWorkerRequest(worker_id="w1")
        assert (await stub.UndrainWorker(undrain, metadata=good, timeout=2)).removed
        assert not (await stub.UndrainWorker(undrain, metadata=good, timeout=2)).removed

        cordon = await stub.CordonNode(admin_pb2.CordonNodeRequest(node="rack-1", reason="fans"), metadata=good,
                                       timeout=2)
        assert cordon.intent.node == "rack-1"
        row = await wait_until(lambda: _cordoned(stub, "w1"), 10, "cordon visible")
        assert not row.routable
        with pytest.raises(grpc.aio.AioRpcError) as unknown_node:
            await stub.CordonNode(admin_pb2.CordonNodeRequest(node="rack-9"), metadata=good, timeout=2)
        assert unknown_node.value.code() == grpc.StatusCode.NOT_FOUND
        uncordon = admin_pb2.UncordonNodeRequest(node="rack-1")
        assert (await stub.UncordonNode(uncordon, metadata=good, timeout=2)).removed

        spec = registry_pb2.ModelSpec(name="llama-8b", checkpoint="tiny", desired_prefill_workers=2,
                                      max_context_tokens=4096, max_output_tokens=8192)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.PutModelSpec(admin_pb2.PutModelSpecRequest(spec=spec), metadata=good, timeout=2)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_output_tokens" in (invalid.value.details() or "")
        spec.max_output_tokens = 1024
        stored = await stub.PutModelSpec(admin_pb2.PutModelSpecRequest(spec=spec), metadata=good, timeout=2)
        assert stored.spec.schema_version == 1 and stored.spec.desired_prefill_workers == 2
        listed = await wait_until(lambda: _models(stub), 10, "model spec listed")
        assert [m.name for m in listed] == ["llama-8b"]
        delete = admin_pb2.DeleteModelSpecRequest(name="llama-8b")
        await stub.DeleteModelSpec(delete, metadata=good, timeout=2)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.DeleteModelSpec(delete, metadata=good, timeout=2)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def _drained(stub: admin_pb2_grpc.AdminStub, worker_id: str) -> admin_pb2.WorkerStatus | None:
    row = await worker_status(stub, worker_id)
    return row if row is not None and row.HasField("drain") else None


async def _cordoned(stub: admin_pb2_grpc.AdminStub, worker_id: str) -> admin_pb2.WorkerStatus | None:
    row = await worker_status(stub, worker_id)
    return row if row is not None and row.node_cordoned else None


async def _models(stub: admin_pb2_grpc.AdminStub) -> list[registry_pb2.ModelSpec]:
    return list((await stub.ListModelSpecs(admin_pb2.ListModelSpecsRequest(), timeout=2)).models)


def sim_node(node: str, count: int, *, name: str, catalog_id: str, failed: tuple[int, ...] = ()
             ) -> registry_pb2.NodeRecord:
    gpus = []
    for index in range(count):
        gpu = registry_pb2.GpuInfo(index=index, uuid=f"SIM-{node}-{index}", name=name, catalog_id=catalog_id,
                                   health=registry_pb2.GPU_HEALTH_OK)
        if index in failed:
            gpu.health = registry_pb2.GPU_HEALTH_FAILED
            gpu.health_reason = "XID 79: GPU has fallen off the bus"
        gpus.append(gpu)
    return registry_pb2.NodeRecord(node=node, host="127.0.0.1", gpus=gpus, simulated=True)


async def test_fleet_status_gpus_workers_and_leases(etcd: EtcdServer, client: EtcdClient, processes: Any) -> None:
    replica = start_replica(processes, etcd, "cp-fleet")
    registry = Registry(client, KEYS)
    agents = []
    for record in (sim_node("node-a", 4, name="NVIDIA H100 80GB HBM3", catalog_id="H100-SXM", failed=(3,)),
                   sim_node("node-b", 2, name="NVIDIA L40S", catalog_id="", failed=(1,))):
        session = LeaseSession(client, ttl=TTL, name=record.node)
        session.start()
        agents.append(session)
        assert await session.wait_alive(10)
        await registry.register_node(session, record)
    # All four workers answer SERVING from one health server; d1's GPU has failed.
    shared = GrpcService("127.0.0.1:0", service_names=[])
    endpoint = f"127.0.0.1:{await shared.start()}"
    fleet_workers = (
        FakeWorker(client, "p0", role=common_pb2.ROLE_PREFILL, node="node-a",
                   gpus=("SIM-node-a-0", "SIM-node-a-1"), endpoint=endpoint),
        FakeWorker(client, "d0", role=common_pb2.ROLE_DECODE, node="node-a", gpus=("SIM-node-a-2",),
                   endpoint=endpoint),
        FakeWorker(client, "u0", role=common_pb2.ROLE_UNIFIED, node="node-b", gpus=("SIM-node-b-0",),
                   endpoint=endpoint),
        FakeWorker(client, "d1", role=common_pb2.ROLE_DECODE, node="node-b", gpus=("SIM-node-b-1",),
                   endpoint=endpoint),
    )
    try:
        async with workers(*fleet_workers), admin(replica.endpoint) as stub:
            row = await wait_until(verdict_is(stub, "d1", registry_pb2.SERVING_STATUS_NOT_SERVING), 10,
                                   "failed GPU flags its worker")
            assert "SIM-node-b-1 health FAILED: XID 79" in row.health.reason and not row.routable
            for worker_id in ("p0", "d0", "u0"):
                await wait_until(verdict_is(stub, worker_id, registry_pb2.SERVING_STATUS_SERVING), 10, worker_id)

            fleet = await stub.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2)
            rows = {r.gpu_model: r for r in fleet.gpu_models}
            assert rows["H100-SXM"] == admin_pb2.GpuModelSummary(
                gpu_model="H100-SXM", total=4, prefill=2, decode=1, idle=1, unhealthy=1, simulated=4)
            assert rows["NVIDIA L40S"] == admin_pb2.GpuModelSummary(
                gpu_model="NVIDIA L40S", total=2, decode=1, unified=1, unhealthy=1, simulated=2)
            assert (fleet.nodes, fleet.workers, fleet.workers_ready, fleet.workers_not_serving) == (2, 4, 4, 1)
            assert fleet.answered_by == "cp-fleet" and fleet.leader.replica_id == "cp-fleet"
            assert fleet.revision > 0 and fleet.view_staleness_s == 0

            gpus = (await stub.ListGpus(admin_pb2.ListGpusRequest(node="node-b"), timeout=2)).gpus
            assert [(g.gpu.uuid, g.worker_id, g.role) for g in gpus] == [
                ("SIM-node-b-0", "u0", common_pb2.ROLE_UNIFIED), ("SIM-node-b-1", "d1", common_pb2.ROLE_DECODE)]
            assert all(g.simulated for g in gpus)
            decode = await stub.ListWorkers(admin_pb2.ListWorkersRequest(role=common_pb2.ROLE_DECODE), timeout=2)
            assert [(w.record.worker_id, w.routable) for w in decode.workers] == [("d0", True), ("d1", False)]
            nodes = await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=2)
            assert [n.record.node for n in nodes.nodes] == ["node-a", "node-b"]

            leases = (await stub.ListLeases(admin_pb2.ListLeasesRequest(), timeout=5)).leases
            holders = {lease.holder for lease in leases}
            assert {"control plane cp-fleet", "node node-a", "node node-b", "worker p0", "worker d1"} <= holders
            leader_lease = next(lease for lease in leases if lease.holder == "control plane cp-fleet")
            assert KEYS.health("d1") in leader_lease.keys and leader_lease.granted_ttl_s == TTL
    finally:
        for session in agents:
            await session.close()
        await shared.stop(grace=0)


async def test_admin_over_tls(etcd: EtcdServer, processes: Any, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make a test certificate: apt-get install openssl (.ci/run does)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_cert = await asyncio.create_subprocess_exec(
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await make_cert.communicate()
    assert make_cert.returncode == 0, output.decode(errors="replace")
    replica = processes.start("cp-tls", "controlplane.server", "--etcd", etcd.endpoint, "--listen", "127.0.0.1:0",
                              "--replica-id", "cp-tls", "--lease-ttl", str(TTL), "--shutdown-grace", "2",
                              "--tls-cert", str(cert), "--tls-key", str(key), wait=False)
    assert replica.ready_path is not None
    await wait_until(replica.ready_path.exists, 30, "ready file")
    endpoint = json.loads(replica.ready_path.read_text())["endpoint"]
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(endpoint, credentials) as channel:
        fleet = await wait_until(
            lambda: admin_pb2_grpc.AdminStub(channel).FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2), 10,
            "FleetStatus over TLS")
        assert fleet.answered_by == "cp-tls"
    async with admin(endpoint) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plaintext.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
