"""An outsider holds its share of every bounded state; the router's real requests keep flowing.

The outsider talks to the workers directly (no router): it floods one
prefill worker's Prefill and never pulls a handle, opens idle Decode streams
on the decode worker, and opens WatchLoad streams asking for 1 ms reports.
Each cap answers it RESOURCE_EXHAUSTED at once with a retry hint; the
router's requests, run meanwhile, all end OK (a prefill worker whose handle
store is full refuses, the router goes to the other one). Figures are
printed (run with -s) and asserted where they are exact.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.faults.conftest import MODEL, SIM, Fleet, get_load, wait_models, wait_until
from tests.support.load import LoadGenerator

pytestmark = [pytest.mark.fault, pytest.mark.integration]

MAX_HANDLES = 16
# The router is one peer too: its share must hold the real traffic (REAL streams at once).
PER_PEER = 16
REAL = 12
WATCHERS = 6
HINT = "tandem-retry-after-ms"


def hint_of(exc: grpc.aio.AioRpcError) -> int | None:
    for key, value in exc.trailing_metadata() or ():
        if key == HINT:
            return int(value)
    return None


async def flood_prefill(endpoint: str, calls: int) -> tuple[int, list[grpc.aio.AioRpcError]]:
    """`calls` Prefills, 8 at a time, whose handles are never pulled: (accepted, refusals)."""
    accepted, refused = 0, []
    gate = asyncio.Semaphore(8)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = worker_pb2_grpc.PrefillStub(channel)

        async def one(i: int) -> None:
            nonlocal accepted
            async with gate:
                try:
                    await stub.Prefill(worker_pb2.PrefillRequest(
                        model=MODEL, prompt_token_ids=[40 + i % 50, *range(50, 90)]), timeout=30)
                    accepted += 1
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc)

        await asyncio.gather(*(one(i) for i in range(calls)))
    return accepted, refused


async def test_an_outsider_at_every_cap_leaves_real_requests_flowing(fleet: Fleet) -> None:
    sim = (*SIM, "--speedup", "20", "--max-load-watchers", str(WATCHERS))
    p0 = fleet.start("p0", "prefill_svc", *sim, "--max-kv-handles", str(MAX_HANDLES), "--kv-handle-ttl", "600")
    fleet.start("p1", "prefill_svc", *sim)
    d0 = fleet.start("d0", "decode_svc", *sim, "--max-batch-size", "64", "--max-requests-per-peer", str(PER_PEER))
    router = fleet.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8", "--policy", "round-robin")
    await wait_models(router.endpoint, 2, 1)

    # 1. Prefill flood: the store keeps MAX_HANDLES and refuses the rest at once, with a hint.
    accepted, refused = await flood_prefill(p0.endpoint, 4 * MAX_HANDLES)
    assert accepted == MAX_HANDLES and len(refused) == 3 * MAX_HANDLES
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused[0]
    assert all(hint_of(e) for e in refused) and "open KV handles (limit 16)" in (refused[0].details() or "")
    assert (await get_load(p0.endpoint)).open_kv_handles == MAX_HANDLES

    async with contextlib.AsyncExitStack() as stack:
        # 2. Idle Decode streams on one connection: PER_PEER admitted, the rest refused at once.
        outsider = await stack.enter_async_context(grpc.aio.insecure_channel(d0.endpoint))
        decode = worker_pb2_grpc.DecodeStub(outsider)
        idle, decode_refused = [], []
        for i in range(3 * PER_PEER):
            call = decode.Decode(worker_pb2.DecodeRequest(
                model=MODEL, prompt_token_ids=[40 + i, *range(50, 60)],
                sampling=common_pb2.SamplingParams(max_tokens=8000, ignore_eos=True)), timeout=120)
            stack.callback(call.cancel)
            try:
                await call.read()  # admitted: it streams; we stop reading (flow control idles it)
                idle.append(call)
            except grpc.aio.AioRpcError as exc:
                decode_refused.append(exc)
        assert len(idle) == PER_PEER and len(decode_refused) == 2 * PER_PEER
        assert {e.code() for e in decode_refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(hint_of(e) for e in decode_refused)

        # 3. WatchLoad at 1 ms: the worker's cap (the router holds one stream) refuses the rest.
        watch = worker_pb2_grpc.WorkerStub(outsider)
        watchers, watch_refused = [], []
        for _ in range(3 * WATCHERS):
            stream = watch.WatchLoad(worker_pb2.WatchLoadRequest(min_interval_ms=1), timeout=120)
            stack.callback(stream.cancel)
            try:
                await stream.read()
                watchers.append(stream)
            except grpc.aio.AioRpcError as exc:
                watch_refused.append(exc)
        assert 0 < len(watchers) <= WATCHERS and len(watchers) + len(watch_refused) == 3 * WATCHERS
        assert {e.code() for e in watch_refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(hint_of(e) for e in watch_refused)

        # 4. Real traffic through the router meanwhile: every request ends OK.
        sampling = common_pb2.SamplingParams(max_tokens=16, ignore_eos=True)
        report = await LoadGenerator(router.endpoint, MODEL, streams=REAL, sampling=sampling).run_once()
        assert report.failures == []
        assert (await get_load(p0.endpoint)).open_kv_handles == MAX_HANDLES  # the outsider's, still held
        print(f"\nbounded state: {MAX_HANDLES} handles held on p0 by the outsider, "
              f"{len(refused)} of its {accepted + len(refused)} Prefills refused; "
              f"{len(idle)} idle Decodes admitted, {len(decode_refused)} refused; "
              f"{len(watchers)} 1 ms WatchLoads admitted, {len(watch_refused)} refused; "
              f"real requests served {report.completed}/{len(report.results)} in {report.seconds:.2f}s, "
              f"{sum(r.retries for r in report.results)} worker refusals retried by the router "
              f"(prefill on {sorted({r.prefill_worker_id for r in report.results})})")

    # The idle streams are gone: the decode worker holds nothing for the outsider any more.
    await wait_until(lambda: _idle_decode(d0.endpoint), 30, "decode worker back to no request in flight")


async def _idle_decode(endpoint: str) -> bool:
    return (await get_load(endpoint)).active_requests == 0
