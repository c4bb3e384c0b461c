"""Lease sessions, GPU claims, intents and the watch view against a real etcd."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from controlplane.etcd_server import EtcdServer
from registry.claims import GpuAlreadyClaimed
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys, Kind
from registry.session import LeaseSession
from registry.store import Registry
from registry.view import RegistryView
from tandem.v1 import common_pb2, registry_pb2

pytestmark = pytest.mark.integration

KEYS = Keys()


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(EtcdSettings.parse(etcd.endpoint, timeout=1.0)) as c:
        yield c


async def new_session(client: EtcdClient, name: str, ttl: int = 2) -> LeaseSession:
    session = LeaseSession(client, ttl=ttl, name=name)
    session.start()
    assert await session.wait_alive(10)
    return session


def worker(worker_id: str) -> registry_pb2.WorkerRecord:
    return registry_pb2.WorkerRecord(worker_id=worker_id, role=common_pb2.ROLE_PREFILL, model="m",
                                     endpoint="127.0.0.1:1", state=registry_pb2.WORKER_STATE_READY)


async def wait_until(predicate, timeout: float) -> float:  # type: ignore[no-untyped-def]
    """Polls `predicate()` (sync or async) until true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"condition not met within {timeout}s"
        await asyncio.sleep(0.05)


async def test_clean_close_removes_keys_at_once(client: EtcdClient) -> None:
    registry = Registry(client, KEYS)
    session = await new_session(client, "w1", ttl=30)
    await registry.register_worker(session, worker("w1"))
    assert await registry.get(Kind.WORKER, "w1") is not None
    await session.close()
    await session.close()
    assert await registry.get(Kind.WORKER, "w1") is None  # no waiting for a 30 s TTL


async def test_double_gpu_claim_is_refused_naming_the_holder(client: EtcdClient) -> None:
    registry = Registry(client, KEYS)
    first, second = await new_session(client, "a"), await new_session(client, "b")
    try:
        await registry.claim_gpus(first, "worker-a", common_pb2.ROLE_PREFILL, "n1", ["GPU-1", "GPU-2"])
        with pytest.raises(GpuAlreadyClaimed, match="GPU-2 is held by worker worker-a"):
            await registry.claim_gpus(second, "worker-b", common_pb2.ROLE_DECODE, "n1", ["GPU-3", "GPU-2"])
        # All or nothing: GPU-3 was not taken by the refused claim.
        assert await registry.get(Kind.GPU_CLAIM, "GPU-3") is None
        # Claiming again what one already holds is fine.
        await registry.claim_gpus(first, "worker-a", common_pb2.ROLE_PREFILL, "n1", ["GPU-1", "GPU-2"])
        await first.close()
        await registry.claim_gpus(second, "worker-b", common_pb2.ROLE_DECODE, "n1", ["GPU-2"])
        claim = await registry.get(Kind.GPU_CLAIM, "GPU-2")
        assert claim is not None and claim.record.worker_id == "worker-b"
    finally:
        await first.close()
        await second.close()


async def test_deleted_keys_heal_within_a_keepalive_under_the_same_lease(client: EtcdClient) -> None:
    lost: list[str] = []
    session = LeaseSession(client, ttl=3, name="w1", on_claim_lost=lambda held: lost.extend(held))
    session.start()
    other = await new_session(client, "other", ttl=3)
    registry = Registry(client, KEYS)
    try:
        assert await session.wait_alive(10)
        await registry.register_worker(session, worker("w1"))
        await registry.claim_gpus(session, "w1", common_pb2.ROLE_PREFILL, "n", ["GPU-H1", "GPU-H2"])
        lease = session.lease_id
        worker_key, claim_key, taken_key = KEYS.worker("w1"), KEYS.gpu_claim("GPU-H1"), KEYS.gpu_claim("GPU-H2")
        assert await client.delete(worker_key) and await client.delete(claim_key) and await client.delete(taken_key)
        # Someone claims GPU-H2 in the gap: it is theirs now, and the session reports it lost.
        await registry.claim_gpus(other, "w2", common_pb2.ROLE_DECODE, "n", ["GPU-H2"])

        async def healed() -> bool:
            found = [await client.get(k) for k in (worker_key, claim_key)]
            return all(kv is not None and kv.lease == lease for kv in found)

        took = await wait_until(healed, 10)
        assert session.lease_id == lease and session.regrants == 0
        holder = await registry.get(Kind.GPU_CLAIM, "GPU-H2")
        assert holder is not None and holder.record.worker_id == "w2"
        await wait_until(lambda: lost == [taken_key], 10)
        logging.getLogger(__name__).info("deleted keys healed in %.2f s", took)
    finally:
        await session.close()
        await other.close()
    assert await client.get(worker_key) is None and await client.get(claim_key) is None


async def test_claim_frees_when_its_holder_is_killed(etcd: EtcdServer, client: EtcdClient, processes) -> None:  # type: ignore[no-untyped-def]
    holder = processes.start("holder", "tests.support.lease_holder", "--etcd", etcd.endpoint,
                             "--worker-id", "victim", "--gpus", "GPU-9", "--ttl", "2")
    registry = Registry(client, KEYS)
    assert (await registry.get(Kind.GPU_CLAIM, "GPU-9")) is not None
    holder.kill()
    took = await wait_until(lambda: _absent(registry), 10)
    assert took <= 2 + 1.5, f"claim outlived the 2 s TTL by {took - 2:.1f}s"
    session = await new_session(client, "next")
    await registry.claim_gpus(session, "successor", common_pb2.ROLE_DECODE, "n", ["GPU-9"])
    await session.close()


async def _absent(registry: Registry) -> bool:
    return await registry.get(Kind.GPU_CLAIM, "GPU-9") is None


async def test_view_sees_kill_within_ttl_and_clean_stop_at_once(etcd: EtcdServer, client: EtcdClient,
                                                                processes) -> None:  # type: ignore[no-untyped-def]
    view = RegistryView(client, KEYS, probe_interval=0.2)
    view.start()
    try:
        assert await view.wait_synced(10)
        killed = processes.start("killed", "tests.support.lease_holder", "--etcd", etcd.endpoint,
                                 "--worker-id", "killed", "--ttl", "2")
        stopped = processes.start("stopped", "tests.support.lease_holder", "--etcd", etcd.endpoint,
                                  "--worker-id", "stopped", "--ttl", "2")
        assert await view.wait_for(lambda v: {"killed", "stopped"} <= set(v.entries(Kind.WORKER)), 10)
        killed.kill()
        start = time.monotonic()
        assert await view.wait_for(lambda v: "killed" not in v.entries(Kind.WORKER), 10)
        assert time.monotonic() - start <= 2 + 1.0 + 0.5
        stopped.stop()
        start = time.monotonic()
        assert await view.wait_for(lambda v: "stopped" not in v.entries(Kind.WORKER), 5)
        assert time.monotonic() - start < 1.0, "a cleanly stopped worker must vanish at once (lease revoked)"
    finally:
        await view.close()


@pytest.mark.fault
@pytest.mark.parametrize("wipe", [False, True], ids=["restart", "wipe"])
async def test_reregistration_after_etcd_restart_without_restarting_the_worker(
        etcd: EtcdServer, client: EtcdClient, wipe: bool) -> None:
    registry = Registry(client, KEYS)
    session = await new_session(client, "survivor", ttl=2)
    try:
        await registry.register_worker(session, worker("survivor"))
        await registry.claim_gpus(session, "survivor", common_pb2.ROLE_PREFILL, "n", ["GPU-S"])
        etcd.kill()
        if wipe:
            etcd.wipe()
        etcd.start()
        took = await wait_until(
            lambda: _registered(registry, ("survivor", "GPU-S")), timeout=2 + 2 + 5)
        assert took <= 2 + 2, f"re-registration took {took:.1f}s, over TTL + 2 s"
        if wipe:
            assert session.regrants >= 1
        # Exactly one record and one claim: nothing duplicated.
        assert [e.name for e in (await registry.list(Kind.WORKER))[1]] == ["survivor"]
        assert [e.name for e in (await registry.list(Kind.GPU_CLAIM))[1]] == ["GPU-S"]
    finally:
        await session.close()


async def _registered(registry: Registry, names: tuple[str, str]) -> bool:
    try:
        return (await registry.get(Kind.WORKER, names[0]) is not None
                and await registry.get(Kind.GPU_CLAIM, names[1]) is not None)
    except ConnectionError:
        return False


@pytest.mark.fault
async def test_view_serves_while_etcd_is_stopped_and_reports_staleness(etcd: EtcdServer,
                                                                       client: EtcdClient) -> None:
    registry = Registry(client, KEYS)
    session = await new_session(client, "w", ttl=10)
    view = RegistryView(client, KEYS, probe_interval=0.2)
    view.start()
    try:
        await registry.register_worker(session, worker("w"))
        assert await view.wait_for(lambda v: "w" in v.entries(Kind.WORKER), 5)
        await wait_until(lambda: view.staleness() == 0, 5)
        etcd.pause()
        try:
            await wait_until(lambda: view.staleness() > 1.0, 10)
            assert "w" in view.entries(Kind.WORKER), "the view must keep serving its last state"
        finally:
            etcd.resume()
        await wait_until(lambda: view.staleness() == 0, 10)
        await registry.set_drain("w", "test", "after outage")
        assert await view.wait_for(lambda v: "w" in v.entries(Kind.DRAIN), 5)
    finally:
        await view.close()
        await session.close()


class LaggingClient(EtcdClient):
    """Runs `before_first_watch` between the view's first list and its first watch,
    so history the view has not seen yet can be compacted away under it."""

    before_first_watch = None

    async def watch(self, prefix: str, start_revision: int):  # type: ignore[no-untyped-def,override]
        hook, self.before_first_watch = self.before_first_watch, None
        if hook is not None:
            await hook()
        async for events in super().watch(prefix, start_revision):
            yield events


async def test_view_converges_after_compaction_and_skips_malformed(etcd: EtcdServer, client: EtcdClient,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    registry = Registry(client, KEYS)
    session = await new_session(client, "c", ttl=10)
    lagging = await LaggingClient(EtcdSettings.parse(etcd.endpoint)).connect()
    view = RegistryView(lagging, KEYS, probe_interval=0.2)

    async def change_and_compact() -> None:
        for i in range(5):
            await registry.register_worker(session, worker(f"late-{i}"))
        await registry.deregister_worker(session, "early")
        await client.compact(await client.put(KEYS.model("filler"), b"x"))

    try:
        await registry.register_worker(session, worker("early"))
        await client.put(KEYS.worker("garbage"), b"{definitely not a record")
        lagging.before_first_watch = change_and_compact  # type: ignore[assignment]
        view.start()
        assert await view.wait_for(
            lambda v: set(v.entries(Kind.WORKER)) == {f"late-{i}" for i in range(5)}, 10)
        assert view.resyncs >= 1, "the compacted watch must have forced a re-list"
        assert "skipping malformed registry value" in caplog.text
    finally:
        await view.close()
        await lagging.close()
        await session.close()


async def test_intents_and_model_specs_persist_without_lease(client: EtcdClient) -> None:
    registry = Registry(client, KEYS)
    intent = await registry.set_drain("w-7", "alice", "maintenance")
    assert intent.requested_by == "alice"
    await registry.set_cordon("node-3", "bob", "bad fan")
    await registry.put_model(registry_pb2.ModelSpec(name="llama", checkpoint="/models/llama",
                                                    desired_prefill_workers=2))
    assert (await registry.get(Kind.DRAIN, "w-7")).record.reason == "maintenance"  # type: ignore[union-attr]
    assert (await registry.get(Kind.CORDON, "node-3")).record.requested_by == "bob"  # type: ignore[union-attr]
    assert (await registry.get(Kind.MODEL, "llama")).record.desired_prefill_workers == 2  # type: ignore[union-attr]
    assert await registry.clear_drain("w-7") is True
    assert await registry.clear_drain("w-7") is False
    with pytest.raises(ValueError, match="node must be"):
        await registry.set_cordon("bad/name", "x", "y")
