"""vLLM's prefix cache, opt-in: its events reach Tandem's KV event log as the hashes routers compute.

An in-process VllmEngine with `extra["prefix_caching"] = "1"` (one engine
for the module; its start is most of the module's time, 45-70 s on 2 busy
cores): a prompt's full blocks appear in `kv_events()` as
runtime.prefix_hash's hashes of the prompt, a prompt sharing a prefix adds
only its own blocks and reports the shared ones as cached, and a decode
that imports KV computes from the imported bytes even where the engine's
cache holds the same prompt. vLLM's own event publisher, without an engine,
shows the bridge replaying batches it missed and starting over when a new
publisher takes the socket.

The router-level drill (`slow`: two vLLM workers of its own, 1.5 minutes on
2 busy cores) runs two vLLM decode workers with `--vllm-prefix-caching`
behind a router: once the router has indexed the worker that served a long
prompt, the prompt's next turns go to that worker.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from engine.base import DecodeRequest, Engine, EngineConfig, EngineError, PrefillRequest, Sampling, create_engine
from engine.kv_events import KvEventLog
from engine.vllm.kv_events_bridge import KvEventsBridge
from runtime.prefix_hash import block_hashes
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed
from tests.vllm.conftest import BLOCK, MODEL, fleet_of, vllm_worker_args

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SAMPLING = Sampling(max_tokens=12, ignore_eos=True)
POLL_S = 0.02
# Events leave vLLM's engine core after the step that caused them, on another socket than the outputs.
EVENTS_WITHIN_S = 30.0


def config(cache: Path, **extra: str) -> EngineConfig:
    return EngineConfig(model="tiny-vllm", cache_dir=str(cache), kv_block_size=BLOCK, kv_blocks=64, max_batch_size=4,
                        extra=extra)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(vllm_cache: Path) -> AsyncIterator[Engine]:
    engine = create_engine("vllm", config(vllm_cache, prefix_caching="1"))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()
    assert engine.kv_events() is None


def prompt_of(length: int, salt: int) -> tuple[int, ...]:
    return tuple((i * 11 + salt) % 500 + 1 for i in range(length))


async def stored_after(log: KvEventLog, seq: int, count: int) -> tuple[int, ...]:
    """The hashes stored after event `seq`, once `count` of them are there."""
    deadline = asyncio.get_running_loop().time() + EVENTS_WITHIN_S
    while True:
        delta = log.delta_since(seq)
        assert delta is not None
        if len(delta.stored) >= count or asyncio.get_running_loop().time() > deadline:
            return delta.stored
        await asyncio.sleep(POLL_S)


async def run(engine: Engine, request: DecodeRequest) -> list[int]:
    return [t async for step in engine.decode(request) for t in step.token_ids]


async def test_a_prompts_full_blocks_are_published_as_the_routers_hashes(engine: Engine) -> None:
    log = engine.kv_events()
    assert log is not None and log.block_size == BLOCK == engine.stats().kv_block_size
    prompt = prompt_of(4 * BLOCK + 5, salt=7)
    seq = log.seq
    result = await engine.prefill(PrefillRequest("p", prompt, Sampling(max_tokens=1)))
    assert result.cached_tokens == 0
    assert await stored_after(log, seq, 4) == tuple(block_hashes(prompt, BLOCK))

    # Two blocks in common, then another tail: vLLM serves the two and publishes only the new blocks,
    # chained from the shared ones (its events name the parent by vLLM's own hash).
    other = (*prompt[:2 * BLOCK], *prompt_of(3 * BLOCK, salt=3))
    seq = log.seq
    result = await engine.prefill(PrefillRequest("q", other, Sampling(max_tokens=1)))
    assert result.cached_tokens == 2 * BLOCK
    assert await stored_after(log, seq, 3) == tuple(block_hashes(other, BLOCK)[2:])
    assert set(block_hashes(prompt, BLOCK) + block_hashes(other, BLOCK)) <= set(log.snapshot().stored)


async def test_a_decode_computes_from_the_imported_kv_not_from_its_cache(engine: Engine) -> None:
    """The prompt is a whole number of blocks, so a local hit would cover every imported token."""
    prompt = prompt_of(4 * BLOCK, salt=5)
    unified = await run(engine, DecodeRequest("u", prompt, SAMPLING))  # now cached here
    mine = await engine.prefill(PrefillRequest("p", prompt, SAMPLING))
    assert mine.kv is not None and mine.cached_tokens == 3 * BLOCK
    split = await run(engine, DecodeRequest("d", prompt, SAMPLING, kv=mine.kv, first_token=mine.first_token))
    assert [mine.first_token, *split] == unified
    # Another prompt's KV under this prompt: the output follows the KV imported, not the cached one.
    theirs = await engine.prefill(PrefillRequest("o", prompt_of(4 * BLOCK, salt=9), SAMPLING))
    assert theirs.kv is not None
    swapped = await run(engine, DecodeRequest("s", prompt, SAMPLING, kv=theirs.kv, first_token=mine.first_token))
    assert [mine.first_token, *swapped] != unified


async def test_without_the_setting_nothing_is_published(vllm_cache: Path) -> None:
    assert create_engine("vllm", config(vllm_cache)).kv_events() is None
    engine = create_engine("vllm", config(vllm_cache, prefix_caching="yes"))
    with pytest.raises(EngineError, match='prefix_caching"] must be "0" or "1"'):
        await engine.start()
    await engine.close()


def batch(*events: Any) -> Any:
    from vllm.distributed.kv_events import KVEventBatch

    return KVEventBatch(ts=0.0, events=list(events))


def block_stored(names: list[bytes | int], parent: bytes | None, tokens: tuple[int, ...]) -> Any:
    from vllm.distributed.kv_events import BlockStored

    return BlockStored(block_hashes=names, parent_block_hash=parent, token_ids=list(tokens), block_size=BLOCK,
                       lora_id=None, medium="GPU", lora_name=None)


def publisher(bridge: KvEventsBridge) -> Any:
    from vllm.distributed.kv_events import ZmqEventPublisher

    return ZmqEventPublisher(0, endpoint=bridge.endpoint, replay_endpoint=bridge.replay_endpoint)


async def until_held(bridge: KvEventsBridge, publish: Any, expected: list[int]) -> None:
    """Publishes a batch that changes nothing until the bridge holds `expected`: ZeroMQ drops what a
    subscriber not yet connected misses, and any batch that arrives shows the bridge the gap."""
    from vllm.distributed.kv_events import BlockRemoved

    async def check() -> bool:
        if bridge.events.held() == expected:
            return True
        publish(batch(BlockRemoved(block_hashes=[b"never-stored"], medium="GPU")))
        return False

    await eventually(check, f"the bridge holds {len(expected)} blocks")


async def test_lost_batches_come_back_from_the_replay_and_a_restart_starts_over(tmp_path: Path) -> None:
    """vLLM's own publisher, without an engine: batches published before the bridge listened are replayed;
    a new publisher numbering from 0 again (a restarted engine core) empties what the bridge held."""
    prompt = prompt_of(3 * BLOCK, salt=1)
    bridge = KvEventsBridge(tmp_path, BLOCK)
    first = publisher(bridge)
    try:
        first.publish(batch(block_stored([b"a0", b"a1"], None, prompt[:2 * BLOCK])))  # nobody listens yet
        first.publish(batch(block_stored([b"a2"], b"a1", prompt[2 * BLOCK:])))
        bridge.start()
        await until_held(bridge, first.publish, block_hashes(prompt, BLOCK))
    finally:
        first.shutdown()
    other = prompt_of(BLOCK, salt=2)
    second = publisher(bridge)
    try:
        second.publish(batch(block_stored([b"b0"], None, other)))
        await until_held(bridge, second.publish, block_hashes(other, BLOCK))
    finally:
        second.shutdown()
        await bridge.close()
        await bridge.close()


@pytest.mark.slow
async def test_a_repeated_long_prompt_goes_to_the_vllm_worker_holding_it(tmp_path: Path, vllm_cache: Path,
                                                                        checkpoint: Path) -> None:
    worker = vllm_worker_args(vllm_cache, "--kv-blocks", "64", "--vllm-prefix-caching")
    router_args = ("--tokenizer", f"{MODEL}={checkpoint}", "--metrics-listen", "127.0.0.1:0")
    with fleet_of(tmp_path, ("d0", "decode_svc", worker), ("d1", "decode_svc", worker),
                  ("r", "router_svc", router_args)) as bed:
        system = list(prompt_of(8 * BLOCK, salt=13))
        blocks = set(block_hashes(system, BLOCK))
        async with grpc.aio.insecure_channel(bed.children["r"].endpoint) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def ask(turn: int) -> str:
                reply = await stub.Complete(inference_pb2.GenerateRequest(
                    model=MODEL, prompt_token_ids=[*system, 3 + turn, 7, 7],
                    sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)), timeout=120)
                return reply.route.decode_worker_id

            async def routable() -> bool:
                listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
                return MODEL in listed and listed[MODEL].decode_workers == 2

            await eventually(routable, "2 vLLM workers routable")
            await eventually(lambda: gauge_at_least(bed, "tandem_router_kv_synced_workers", 2),
                             "the router follows both workers' prefix-cache events")
            first = await ask(0)
            await eventually(lambda: holds(bed, first, blocks), "the worker that served it caches the prompt")
            # Probe once the router indexes the holder's blocks (an earlier turn may make a second holder).
            await eventually(lambda: gauge_at_least(bed, "tandem_router_kv_index_entries", len(blocks)),
                             "the router indexes the holder's blocks")
            for turn in range(1, 6):
                assert await ask(turn) == first
            other = "d1" if first == "d0" else "d0"
            assert not await holds(bed, other, blocks)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + EVENTS_WITHIN_S
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(POLL_S)


async def holds(bed: Testbed, worker: str, blocks: set[int]) -> bool:
    """Whether `worker` holds every block of `blocks`, by its own published snapshot."""
    async with grpc.aio.insecure_channel(bed.children[worker].endpoint) as channel:
        report = await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(kv_snapshot=True))
    assert report.kv_events.block_size == BLOCK == report.kv_block_size_tokens
    return blocks <= set(report.kv_events.stored)


async def gauge_at_least(bed: Testbed, name: str, value: float) -> bool:
    port = bed.children["r"].info["metrics_port"]
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return found is not None and float(found.group(1)) >= value
