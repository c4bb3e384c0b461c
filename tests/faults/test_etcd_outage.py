"""etcd trouble under load: stopped, restarted, wiped, or one member of three lost.

The promises (ARCHITECTURE.md, "Lease rules"; docs/registry.md, "Rules"):
etcd is not on the request path, so requests keep being served while it is
away (the router serves from its last view); a process whose lease was lost
re-grants one and rewrites its keys as soon as etcd answers, without a
restart; a 3-member cluster rides out the loss of one member.
"""

from __future__ import annotations

import asyncio

import pytest

from registry.keys import Keys, Kind
from registry.store import Registry
from tandem.v1 import common_pb2
from tests.faults.conftest import (
    SIM,
    TTL,
    Fleet,
    exited,
    expected_generations,
    pids,
    registered_workers,
    wait_models,
    wait_until,
)
from tests.support.load import LoadGenerator, LoadReport

pytestmark = [pytest.mark.fault, pytest.mark.integration]

SAMPLING = common_pb2.SamplingParams(max_tokens=12, ignore_eos=True)
SHORT = common_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
WORKERS = {"p0", "d0", "d1"}


async def start_fleet(fleet: Fleet) -> str:
    """p0, d0, d1 and a router; returns the router's endpoint once it routes to all three."""
    sim = (*SIM, "--speedup", "50", "--max-batch-size", "32")
    for name, module in (("p0", "prefill_svc"), ("d0", "decode_svc"), ("d1", "decode_svc")):
        fleet.start(name, module, *sim)
    router = fleet.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8")
    await wait_models(router.endpoint, 1, 2)
    return router.endpoint


async def keep_serving_for(load: LoadGenerator, seconds: float) -> int:
    """Holds a fault for `seconds` (the fault's duration, not a wait for readiness) while
    checking that requests keep completing; returns how many completed meanwhile."""
    before = sum(1 for r in load.results if r.done)
    await asyncio.sleep(seconds)
    return sum(1 for r in load.results if r.done) - before


async def assert_exact(report: LoadReport, fleet: Fleet, sampling: common_pb2.SamplingParams = SAMPLING) -> None:
    assert report.failures == [], report.failures
    expected = await expected_generations(fleet.children["d1"].endpoint, [r.prompt for r in report.results], sampling)
    wrong = [r.describe() for r in report.results if r.tokens != expected[tuple(r.prompt)]]
    assert wrong == [], wrong


async def test_leases_expired_on_etcd_side_fail_no_request(fleet: Fleet) -> None:
    """The core of every etcd outage, made deterministic: etcd drops every worker lease at once
    (as it does when it comes back after more than a TTL away); workers re-register by themselves."""
    router = await start_fleet(fleet)
    before = pids(fleet.children)
    load = LoadGenerator(router, "llama-3-8b", streams=8, sampling=SHORT)
    await load.start()
    try:
        await load.wait_completed(16)
        async with fleet.client() as client:
            registry = Registry(client, Keys())
            _, entries = await registry.list(Kind.WORKER)
            for lease in {entry.lease for entry in entries}:
                await client.revoke(lease)
        await _rejoin_and_resume(fleet, router, load, TTL + 2, "every worker re-registered within TTL + 2 s")
        report = await load.stop()
    finally:
        await load.cancel()
    await assert_exact(report, fleet, SHORT)
    assert exited(fleet.children) == [] and pids(fleet.children) == before, "a process restarted"


async def _rejoin_and_resume(fleet: Fleet, router: str, load: LoadGenerator, within: float, what: str) -> None:
    """Every worker registered again within `within` seconds, routable, and 16 more requests served."""
    await wait_until(lambda: _has_all(fleet), within, what)
    await wait_models(router, 1, 2)
    resumed_at = sum(1 for r in load.results if r.done)
    await load.wait_completed(resumed_at + 16)


async def test_etcd_stopped_for_three_ttls_fails_no_request_and_workers_rejoin(fleet: Fleet) -> None:
    router = await start_fleet(fleet)
    before = pids(fleet.children)
    # Many short requests: the moment the leases expire on etcd's side must meet a stream of requests.
    load = LoadGenerator(router, "llama-3-8b", streams=16, sampling=SHORT)
    await load.start()
    try:
        await load.wait_completed(16)
        fleet.etcd.pause()
        try:
            served = await keep_serving_for(load, 3 * TTL)
        finally:
            fleet.etcd.resume()
        assert served > 0, "no request completed while etcd was stopped: the router must serve from its last view"
        # Leases expired on etcd's side during the stop: every worker re-grants and re-registers by itself.
        await _rejoin_and_resume(fleet, router, load, TTL + 10, "every worker registered again after the stop")
        report = await load.stop()
    finally:
        await load.cancel()
    await assert_exact(report, fleet, SHORT)
    assert exited(fleet.children) == [] and pids(fleet.children) == before, "a process restarted"


async def _has_all(fleet: Fleet) -> bool:
    return WORKERS <= await registered_workers(fleet)


@pytest.mark.parametrize("wipe", [False, True], ids=["restart", "wipe"])
async def test_etcd_restart_or_wipe_reregisters_every_worker_within_ttl(fleet: Fleet, wipe: bool) -> None:
    # Requests across the gap are the lease drill's subject; this one asserts re-registration and service after.
    router = await start_fleet(fleet)
    before = pids(fleet.children)
    fleet.etcd.kill()
    if wipe:
        fleet.etcd.wipe()
    fleet.etcd.start()
    await wait_until(lambda: _has_all(fleet), TTL + 2, "every worker re-registered within TTL + 2 s")
    await wait_models(router, 1, 2)
    report = await LoadGenerator(router, "llama-3-8b", streams=8, sampling=SAMPLING).run_once()
    await assert_exact(report, fleet)
    assert exited(fleet.children) == [] and pids(fleet.children) == before, "a process restarted"


async def test_three_member_cluster_loses_one_member_under_load(fleet3: Fleet) -> None:
    router = await start_fleet(fleet3)
    before = pids(fleet3.children)
    load = LoadGenerator(router, "llama-3-8b", streams=8, sampling=SAMPLING)
    await load.start()
    try:
        await load.wait_completed(16)
        # The first endpoint is where every client connected first: the harshest member to lose.
        fleet3.etcds[0].kill()
        served = await keep_serving_for(load, 2 * TTL)
        assert served > 0
        # Leases are still kept alive through the other members, and the router's watch follows them:
        # a worker started after the loss is seen and used.
        fleet3.start("d2", "decode_svc", *SIM, "--speedup", "50")
        await wait_models(router, 1, 3)
        assert WORKERS | {"d2"} <= await registered_workers(fleet3)
        resumed_at = sum(1 for r in load.results if r.done)
        await load.wait_completed(resumed_at + 16)
        report = await load.stop()
    finally:
        await load.cancel()
    await assert_exact(report, fleet3)
    assert exited(fleet3.children) == [] and {n: p for n, p in pids(fleet3.children).items() if n != "d2"} == before
