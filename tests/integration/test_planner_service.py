"""The leader's planner as real control-plane processes against a real etcd.

Workers are registered records served by real grpc health servers (as in
test_controlplane), so what is checked here is the planner's side: it reads
the routers' demand reports and the workers, writes a plan and, in enact
mode, role intents; its writes are fenced by leadership, and a new leader
continues the plan where the old one stopped. The workers' side of a switch
is tests/integration/test_role_switch.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from controlplane.etcd_server import EtcdServer
from registry.etcd_client import EtcdClient
from registry.keys import Kind
from registry.records import encode, parse
from registry.session import LeaseSession
from tandem.v1 import admin_pb2, common_pb2, registry_pb2
from tests.integration.test_controlplane import KEYS, TTL, FakeWorker, admin, client, start_replica, wait_until, workers

pytestmark = pytest.mark.integration

__all__ = ["client"]  # the fixture, used by name

# Rounds every 0.3 s, no dwell: the test sees several plans in a few seconds.
PLANNER = ("--planner-mode", "enact", "--planner-interval-s", "0.3", "--planner-min-dwell-s", "0")
P, D = common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE


def switchable_worker(client: EtcdClient, worker_id: str, role: int) -> FakeWorker:
    worker = FakeWorker(client, worker_id, role=role)
    worker.record.gpu_type, worker.record.gpu_count = "H100-SXM", 1
    worker.record.switchable_roles[:] = [P, D]
    worker.record.capacity.CopyFrom(registry_pb2.WorkerCapacity(kv_blocks_total=20_000, kv_block_size_tokens=16,
                                                                max_batch_size=256))
    return worker


async def write_demand(client: EtcdClient, session: LeaseSession, *, rate: float, prompt: float,
                       output: float) -> None:
    """What a router publishes (router_svc.demand_publisher), under its own lease."""
    report = registry_pb2.DemandReport(router_id="r1", window_s=60, models=[registry_pb2.ModelDemand(
        model="m", requests=int(rate * 60), arrival_rate_rps=rate, finished=int(rate * 60),
        prompt_tokens_mean=prompt, prompt_tokens_p90=prompt, output_tokens_mean=output, output_tokens_p90=output)])
    await session.put(KEYS.demand("r1"), encode(report))


async def plan_of(client: EtcdClient) -> registry_pb2.PlanRecord | None:
    kv = await client.get(KEYS.plan("m"))
    return parse(Kind.PLAN, kv.value) if kv is not None else None  # type: ignore[return-value]


async def role_intents(client: EtcdClient) -> dict[str, registry_pb2.RoleIntent]:
    _, kvs = await client.get_prefix(KEYS.kind_prefix(Kind.ROLE))
    return {kv.key.rsplit("/", 1)[1]: parse(Kind.ROLE, kv.value) for kv in kvs}  # type: ignore[misc]


async def test_fenced_write_lands_only_while_the_guard_key_lives(client: EtcdClient) -> None:
    await client.put("/t/guard", b"x")
    guard = await client.get("/t/guard")
    assert guard is not None
    assert await client.put_all_if_created("/t/guard", guard.create_revision, [("/t/a", b"1"), ("/t/b", b"2")])
    assert (await client.get("/t/a")) is not None and (await client.get("/t/b")) is not None
    await client.delete("/t/guard")
    await client.put("/t/guard", b"y")  # same key, a new candidacy: another create revision
    assert not await client.put_all_if_created("/t/guard", guard.create_revision, [("/t/c", b"3"), ("/t/d", b"4")])
    assert (await client.get("/t/c")) is None and (await client.get("/t/d")) is None


async def test_leader_enacts_a_plan_from_router_demand_and_a_new_leader_continues(
        etcd: EtcdServer, client: EtcdClient, processes: Any) -> None:
    session = LeaseSession(client, ttl=TTL, name="router r1")
    session.start()
    fleet = [switchable_worker(client, "p0", P), *(switchable_worker(client, f"d{i}", D) for i in range(3))]
    async with workers(*fleet):
        assert await session.wait_alive(10)
        # Long prompts, one-token answers, one prefill worker for three decode workers: prefill-bound.
        await write_demand(client, session, rate=10.0, prompt=8000, output=2)
        first = start_replica(processes, etcd, "cp-a", *PLANNER)
        intents = await wait_until(lambda: role_intents(client), 30, "the planner asks a worker to switch")
        [(worker_id, intent)] = intents.items()
        assert worker_id.startswith("d") and intent.role == P
        assert intent.requested_by == "planner:cp-a" and intent.plan_generation >= 1
        plan = await plan_of(client)
        assert plan is not None and plan.mode == "enact" and plan.planner == "cp-a"
        assert plan.demand.arrival_rate_rps == pytest.approx(10.0)
        assert plan.planned_goodput_rps > plan.current_goodput_rps or plan.generation > intent.plan_generation
        assert plan.explanation

        # The Admin API and tandemctl show it.
        async with admin(first.endpoint) as stub:
            reply = await stub.GetPlan(admin_pb2.GetPlanRequest(model="m"), timeout=5)
        assert [p.model for p in reply.plans] == ["m"]
        shown = (await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "controlplane.cli", "--endpoint", first.endpoint, "plan"],
            capture_output=True, text=True, timeout=60, check=True)).stdout
        assert "model m" in shown and "goodput" in shown and worker_id in shown

        # The first leader dies without a word; a second replica takes over and plans on from its generation.
        second = start_replica(processes, etcd, "cp-b", *PLANNER)
        last = (await plan_of(client)).generation  # type: ignore[union-attr]
        first.kill()

        async def continued() -> registry_pb2.PlanRecord | None:
            plan = await plan_of(client)
            return plan if plan is not None and plan.planner == "cp-b" and plan.generation > last else None
        await wait_until(continued, 30, "the new leader plans on")
        # Every worker still has exactly one role, and no intent was written twice for one move.
        now = await role_intents(client)
        assert all(i.role in (P, D) for i in now.values())
        assert second.alive()
    await session.close()
