"""KV-aware routing against real etcd, real sim workers and the router's own view and process.

The router's prefix index must match what each worker's prefix cache holds
(the worker's own GetLoad snapshot is the truth) after a router restart, a
worker restart and a dropped event; and a long prefix seen before goes to a
worker that holds it.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys
from router_svc.live_view import LiveView
from runtime.channels import ChannelPool
from runtime.prefix_hash import block_hashes
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
SIM = ("--engine", "sim", "--model", MODEL, "--gpu-type", "H100-SXM", "--speedup", "1000")
BLOCK = 16


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Testbed]:
    bed = Testbed(tmp_path)
    yield bed
    assert not bed.close(), "children left running"


@pytest.fixture
async def view(bed: Testbed) -> AsyncIterator[LiveView]:
    async with EtcdClient(EtcdSettings.parse(bed.etcd.endpoint)) as client:
        channels = ChannelPool()
        live = LiveView(client, Keys(), channels)
        try:
            yield live
        finally:
            await live.close()
            await channels.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def cached_blocks(worker: ManagedProcess) -> set[int]:
    """What the worker's prefix cache holds, as it says itself."""
    async with grpc.aio.insecure_channel(worker.endpoint) as channel:
        report = await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(kv_snapshot=True))
    assert report.kv_events.snapshot and report.kv_events.block_size == BLOCK
    return set(report.kv_events.stored)


async def generate_on(worker: ManagedProcess, prompt: list[int]) -> None:
    """A whole request on a decode worker (it prefills locally and caches the prompt)."""
    async with grpc.aio.insecure_channel(worker.endpoint) as channel:
        async for _ in worker_pb2_grpc.DecodeStub(channel).Decode(worker_pb2.DecodeRequest(
                model=MODEL, prompt_token_ids=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True))):
            pass


def prompt_of(seed: int, length: int = 160) -> list[int]:
    """A prompt no other seed shares a block with (the byte tokenizer's ids are 0..258)."""
    return [3 + seed % 200, *(3 + (i * 31 + seed) % 250 for i in range(length - 1))]


async def in_sync(view: LiveView, worker: ManagedProcess, name: str) -> bool:
    return view.kv.synced(name) and view.kv.held(name) == await cached_blocks(worker)


async def test_a_dropped_event_is_detected_and_the_index_resynchronises(bed: Testbed, view: LiveView) -> None:
    d0 = bed.start("d0", "decode_svc", *SIM)
    # Lose the first report that carries a delta, as a lost message would.
    forward = view._kv_events
    dropped: list[int] = []

    def lossy(worker_id: str, events: worker_pb2.KvEvents | None, fresh: bool) -> bool:
        if events is not None and not events.snapshot and not dropped:
            dropped.append(events.last_seq)
            return True
        return forward(worker_id, events, fresh)

    view.loads._on_kv = lossy
    await view.start()
    await eventually(lambda: in_sync(view, d0, "d0"), "the first snapshot")
    first = prompt_of(1)
    await generate_on(d0, first)
    await eventually(lambda: now(bool(dropped)), "a delta to drop")
    assert not set(block_hashes(first, BLOCK)) <= view.kv.held("d0")  # the router missed them
    # The next delta does not follow the last one applied: the stream is reopened and starts with a snapshot.
    await generate_on(d0, prompt_of(2))
    await eventually(lambda: in_sync(view, d0, "d0"), "resync after the gap")
    assert view.kv.gaps_total == 1 and view.loads.resyncs_total == 1
    assert set(block_hashes(first, BLOCK)[:9]) <= view.kv.held("d0")
    assert view.cached_prefix(MODEL, [*first, 5]).tokens("d0") == 160


async def test_a_restarted_router_rebuilds_its_index_from_the_workers(bed: Testbed) -> None:
    d0 = bed.start("d0", "decode_svc", *SIM)
    d1 = bed.start("d1", "decode_svc", *SIM)
    await generate_on(d0, prompt_of(1))
    await generate_on(d1, prompt_of(2))
    async with EtcdClient(EtcdSettings.parse(bed.etcd.endpoint)) as client:
        for _ in range(2):  # the second view is the router restarted: it knows only what the workers send
            channels = ChannelPool()
            live = LiveView(client, Keys(), channels)
            await live.start()
            try:
                await eventually(lambda live=live: in_sync(live, d0, "d0"), "d0 in sync")  # type: ignore[misc]
                await eventually(lambda live=live: in_sync(live, d1, "d1"), "d1 in sync")  # type: ignore[misc]
                found = live.cached_prefix(MODEL, [*prompt_of(2), 7])
                assert found.decode.as_dict() == {"d1": 160}
            finally:
                await live.close()
                await channels.close()


async def test_a_restarted_worker_is_resynchronised_and_a_departed_one_forgotten(
        bed: Testbed, view: LiveView) -> None:
    d0 = bed.start("d0", "decode_svc", *SIM)
    d1 = bed.start("d1", "decode_svc", *SIM)
    await view.start()
    old = prompt_of(1)
    await generate_on(d0, old)
    await eventually(lambda: in_sync(view, d0, "d0"), "d0 in sync")
    assert view.cached_prefix(MODEL, [*old, 3]).tokens("d0") == 160
    d0.stop()
    d1.stop()
    await eventually(lambda: now("d1" not in view.kv.workers()), "d1 forgotten once its record left")
    d0 = bed.start("d0", "decode_svc", *SIM)
    new = prompt_of(2)
    await generate_on(d0, new)
    await eventually(lambda: in_sync(view, d0, "d0"), "restarted d0 in sync")
    assert view.cached_prefix(MODEL, [*old, 3]).tokens("d0") == 0  # the new process never computed it
    assert view.cached_prefix(MODEL, [*new, 3]).tokens("d0") == 160


async def test_a_repeated_long_prefix_goes_to_the_worker_that_holds_it(bed: Testbed) -> None:
    prefillers = [bed.start(f"p{i}", "prefill_svc", *SIM) for i in range(4)]
    bed.start("d0", "decode_svc", *SIM)
    # 0: never prefill locally, however much of the prompt a decode worker holds (see the next test).
    router = bed.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "0",
                       "--metrics-listen", "127.0.0.1:0")
    system = prompt_of(9, 1024)
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def ask(turn: int) -> inference_pb2.GenerateResponse:
            return await stub.Complete(inference_pb2.GenerateRequest(
                model=MODEL, prompt_token_ids=[*system, 3 + turn, 7, 7],
                sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)), timeout=30)

        async def routable() -> bool:
            listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
            return MODEL in listed and listed[MODEL].prefill_workers == 4

        await eventually(routable, "4 prefill workers routable")
        # Every worker's events in sequence (snapshot received): from the first request on, the router
        # knows what it sent where, and the next turn goes to the holder even on a slow machine.
        await eventually(lambda: _gauge_at_least(router, "tandem_router_kv_synced_workers", 5),
                         "the router follows all 5 workers' prefix-cache events")
        first = await ask(0)
        holder = first.route.prefill_worker_id
        assert holder and first.usage.cached_prompt_tokens == 0
        blocks = set(block_hashes(system, BLOCK))
        worker = next(p for p in prefillers if p.name == holder)
        await eventually(lambda: _holds(worker, blocks), "the holder cached it")
        # The router learns it from the holder's next load report (a turn sent before that may go
        # elsewhere and make a second holder); from then on every turn goes to a holder. Probe only once
        # the router's index holds that many (worker, block) entries: each early probe on a slow machine
        # made one more holder, until all four were.
        await eventually(lambda: _gauge_at_least(router, "tandem_router_kv_index_entries", len(blocks)),
                         "the router indexes the holder's blocks")
        await eventually(lambda: _hits(ask, 1), "a turn routed to the holder")
        holders = {p.name for p in prefillers if blocks <= await cached_blocks(p)}
        for turn in range(2, 12):
            reply = await ask(turn)
            assert reply.route.prefill_worker_id in holders and not reply.route.local_prefill
            assert reply.usage.cached_prompt_tokens == 1024
        assert len(holders) < 4


async def _gauge_at_least(process: ManagedProcess, name: str, value: float) -> bool:
    port = process.info["metrics_port"]
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return found is not None and float(found.group(1)) >= value


async def now(value: bool) -> bool:
    return value


async def _holds(worker: ManagedProcess, blocks: set[int]) -> bool:
    return blocks <= await cached_blocks(worker)


async def _hits(ask: Callable[[int], Awaitable[inference_pb2.GenerateResponse]], turn: int) -> bool:
    return (await ask(turn)).usage.cached_prompt_tokens == 1024


async def test_a_prompt_mostly_cached_on_a_decode_worker_is_prefilled_there(bed: Testbed) -> None:
    bed.start("p0", "prefill_svc", *SIM)
    decoders = [bed.start(f"d{i}", "decode_svc", *SIM) for i in range(2)]
    router = bed.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "16")
    system = prompt_of(5, 512)
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def ask(turn: int) -> inference_pb2.GenerateResponse:
            return await stub.Complete(inference_pb2.GenerateRequest(
                model=MODEL, prompt_token_ids=[*system, 3 + turn, 7, 7],
                sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)), timeout=30)

        async def routable() -> bool:
            listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
            return MODEL in listed and listed[MODEL].decode_workers == 2 and listed[MODEL].prefill_workers == 1

        await eventually(routable, "1P+2D routable")
        first = await ask(0)
        assert not first.route.local_prefill  # 515 tokens, none cached: disaggregated
        # The decode worker imported the prompt's KV: it holds the prefix now, and 3 tokens are left to compute.
        holder = next(d for d in decoders if d.name == first.route.decode_worker_id)
        blocks = set(block_hashes(system, BLOCK))
        await eventually(lambda: _holds(holder, blocks), "the decode worker cached the import")

        async def local_on_a_holder(turn: int) -> bool:
            route = (await ask(turn)).route
            on = next(d for d in decoders if d.name == route.decode_worker_id)
            return route.local_prefill and route.reason == "prefix-cached" and await _holds(on, blocks)

        # (A turn sent before the router learnt of the import is disaggregated, and may make a second holder.)
        await eventually(lambda: local_on_a_holder(1), "a turn prefilled on a holder")
        for turn in range(2, 8):
            assert await local_on_a_holder(turn)
