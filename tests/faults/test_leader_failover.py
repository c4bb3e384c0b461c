"""Leader failover between two control-plane replicas (real processes, real etcd).

Kill -9 the leader: the other replica leads, and has probed and rewritten
every verdict under its own lease, within TTL + 2 s. Stop it cleanly: the
lease is revoked, so the hand-over does not wait for the TTL.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controlplane.etcd_server import EtcdServer
from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys, Kind
from tandem.v1 import admin_pb2, admin_pb2_grpc, registry_pb2
from tests.integration.test_controlplane import TTL, FakeWorker, admin, start_replica, verdict_is, wait_until, workers

pytestmark = [pytest.mark.fault, pytest.mark.integration]

SERVING = registry_pb2.SERVING_STATUS_SERVING
NOT_SERVING = registry_pb2.SERVING_STATUS_NOT_SERVING


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(EtcdSettings.parse(etcd.endpoint, timeout=1.0)) as c:
        yield c


async def leader_seen_by_both(a: ManagedProcess, b: ManagedProcess) -> str:
    """The leader's replica id once both replicas report the same one, else ""."""
    names = []
    for replica in (a, b):
        async with admin(replica.endpoint) as stub:
            fleet = await stub.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2)
            names.append(fleet.leader.replica_id)
    return names[0] if names[0] and names[0] == names[1] else ""


def is_leader_metric(replica: ManagedProcess) -> float:
    port = replica.info["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        for line in reply.read().decode().splitlines():
            # tandem_controlplane_is_leader{replica="cp-0"} 1.0
            if line.startswith("tandem_controlplane_is_leader{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("tandem_controlplane_is_leader not exported")


async def start_pair(processes: Any, etcd: EtcdServer, *args: str) -> dict[str, ManagedProcess]:
    return {name: start_replica(processes, etcd, name, "--metrics-listen", "127.0.0.1:0", *args)
            for name in ("cp-a", "cp-b")}


async def test_killed_leader_is_replaced_and_verdicts_rewritten_within_ttl(
        etcd: EtcdServer, client: EtcdClient, processes: Any) -> None:
    replicas = await start_pair(processes, etcd)
    async with workers(FakeWorker(client, "ok"), FakeWorker(client, "sick")) as (_, sick):
        await sick.service.set_serving(False)
        leader = await wait_until(lambda: leader_seen_by_both(replicas["cp-a"], replicas["cp-b"]), 10,
                                  "one leader agreed by both replicas")
        (survivor,) = set(replicas) - {leader}
        assert [is_leader_metric(replicas[leader]), is_leader_metric(replicas[survivor])] == [1.0, 0.0]
        async with admin(replicas[survivor].endpoint) as stub:
            await wait_until(verdict_is(stub, "ok", SERVING, leader), 10, "leader's SERVING verdict")
            await wait_until(verdict_is(stub, "sick", NOT_SERVING, leader), 10, "leader's NOT_SERVING verdict")

            replicas[leader].kill()
            killed_at = time.monotonic()
            deadline = TTL + 2
            await wait_until(lambda: _leads(stub, survivor), deadline, "survivor leads")
            remaining = deadline - (time.monotonic() - killed_at)
            await wait_until(verdict_is(stub, "ok", SERVING, survivor), remaining, "survivor's SERVING verdict")
            remaining = deadline - (time.monotonic() - killed_at)
            row = await wait_until(verdict_is(stub, "sick", NOT_SERVING, survivor), remaining,
                                   "survivor's NOT_SERVING verdict")
            # The sick worker stayed down across the hand-over, with the reason it went down for.
            assert row.health.reason == "2 probes failed: NOT_SERVING" and not row.routable
        assert is_leader_metric(replicas[survivor]) == 1.0


async def _leads(stub: admin_pb2_grpc.AdminStub, replica_id: str) -> bool:
    fleet = await stub.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2)
    return fleet.leader.replica_id == replica_id


async def test_clean_stop_hands_leadership_over_without_waiting_for_the_ttl(
        etcd: EtcdServer, client: EtcdClient, processes: Any) -> None:
    long_ttl = 30
    replicas = await start_pair(processes, etcd, "--lease-ttl", str(long_ttl))
    leader = await wait_until(lambda: leader_seen_by_both(replicas["cp-a"], replicas["cp-b"]), 10, "one leader")
    (survivor,) = set(replicas) - {leader}
    async with workers(FakeWorker(client, "w1")), admin(replicas[survivor].endpoint) as stub:
        await wait_until(verdict_is(stub, "w1", SERVING, leader), 10, "leader's verdict")
        replicas[leader].send(signal.SIGTERM)
        # Well under the 30 s TTL: only a revoked lease explains a hand-over this fast.
        await wait_until(verdict_is(stub, "w1", SERVING, survivor), long_ttl / 3, "survivor's verdict")
        process = replicas[leader].process
        assert process is not None and process.wait(10) == 0, "a clean stop exits 0"


async def test_etcd_outage_reads_serve_stale_mutations_refused_then_leadership_comes_back(
        etcd: EtcdServer, client: EtcdClient, processes: Any) -> None:
    replica = start_replica(processes, etcd, "cp-1", "--etcd-timeout", "0.5", "--admin-token", "t")
    async with workers(FakeWorker(client, "w1")), admin(replica.endpoint) as stub:
        await wait_until(verdict_is(stub, "w1", SERVING, "cp-1"), 10, "verdict before the outage")
        etcd.pause()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.DrainWorker(admin_pb2.DrainWorkerRequest(worker_id="w1"),
                                       metadata=(("authorization", "Bearer t"),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert etcd.endpoint in (refused.value.details() or "")
            # Reads answer from the last view, saying how stale it is, until past the lease TTL.
            stale = await wait_until(lambda: _stale_beyond(stub, TTL + 0.5), 15, "view staleness reported")
            assert [w.record.worker_id for w in (await stub.ListWorkers(admin_pb2.ListWorkersRequest(),
                                                                        timeout=2)).workers] == ["w1"]
            assert stale.leader.replica_id == "cp-1"
        finally:
            etcd.resume()
        await wait_until(lambda: _live(stub), 15, "view live again")
        # The lease expired meanwhile: the replica campaigns again, leads on its own, and its
        # verdicts live under its new lease.
        await wait_until(lambda: _leads(stub, "cp-1"), 15, "leading again after the outage")
        await wait_until(verdict_is(stub, "w1", SERVING, "cp-1"), 15, "verdict rewritten after the outage")
        await wait_until(lambda: _verdict_under_leader_lease(client, "w1"), 15, "verdict bound to the new lease")


async def _live(stub: admin_pb2_grpc.AdminStub) -> bool:
    fleet = await stub.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2)
    return fleet.view_staleness_s == 0


async def _verdict_under_leader_lease(client: EtcdClient, worker_id: str) -> bool:
    keys = Keys()
    _, candidacies = await client.get_prefix(keys.kind_prefix(Kind.ELECTION))
    verdict = await client.get(keys.health(worker_id))
    return len(candidacies) == 1 and verdict is not None and verdict.lease == candidacies[0].lease


async def _stale_beyond(stub: admin_pb2_grpc.AdminStub, seconds: float) -> admin_pb2.FleetStatusResponse | None:
    fleet = await stub.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=2)
    return fleet if fleet.view_staleness_s > seconds else None
