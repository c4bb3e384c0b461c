"""The router in front of vLLM workers, and what a decode worker frees when a stream is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tandem.v1 import worker_pb2
from tests.support.testbed import Testbed
from tests.vllm.conftest import BLOCK, CONTEXT, DECODE_KV_BLOCKS, MODEL, decode, greedy, prefill

pytestmark = pytest.mark.integration


@pytest.fixture
def router(vllm_fleet: Testbed) -> Iterator[Any]:
    from router_svc.client import TandemClient

    with TandemClient(vllm_fleet.children["r"].endpoint, timeout=120) as client:
        yield client


async def test_router_pairs_vllm_prefill_and_decode(router, stubs, tokenizer) -> None:
    for text in ("The quick brown fox jumps over the lazy dog. " * 2, "héllo wörld, naïve café, 你好世界"):
        prompt = list(tokenizer.encode(text))
        completion = await asyncio.to_thread(router.complete, model=MODEL, token_ids=prompt, max_tokens=12,
                                             ignore_eos=True)
        assert completion.route is not None
        assert completion.route.prefill_worker_id == "p" and not completion.route.local_prefill
        assert completion.route.decode_worker_id == "d"
        assert list(completion.token_ids) == await decode(stubs, prompt, greedy())
        assert completion.text == tokenizer.decode(list(completion.token_ids))


async def test_router_serves_chat_on_the_tiny_vllm_model(router) -> None:
    completion = await asyncio.to_thread(router.complete, model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=8)
    assert completion.finish_reason in ("length", "stop_token")
    assert completion.usage is not None and completion.usage.completion_tokens >= 1


async def load(stubs: dict[str, Any]) -> worker_pb2.LoadReport:
    return await stubs["decode_load"].GetLoad(worker_pb2.GetLoadRequest(), timeout=10)


async def wait_idle(stubs: dict[str, Any]) -> None:
    """Until the decode worker has no request in flight (it has handled a cancellation)."""
    for _ in range(600):
        if (await load(stubs)).active_requests == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the decode worker still has a request in flight")


async def test_cancel_mid_decode_frees_the_blocks(stubs) -> None:
    """A cancelled stream leaves vLLM: its blocks are free and it no longer runs, by vLLM's own count.

    The first sequence would run for ~1800 tokens; after its cancel, the load report taken while a
    second sequence runs counts only the second one (vLLM's running requests and KV blocks).
    """
    report = await load(stubs)
    assert report.kv_blocks_total == DECODE_KV_BLOCKS and report.kv_block_size_tokens == BLOCK
    first_prompt = [(i * 13 + 1) % 500 + 1 for i in range(4 * BLOCK)]
    first = stubs["decode"].Decode(worker_pb2.DecodeRequest(
        model=MODEL, prompt_token_ids=first_prompt, sampling=greedy(max_tokens=CONTEXT - 5 * BLOCK)), timeout=300)
    await first.__aiter__().__anext__()
    busy = await load(stubs)
    assert busy.active_sequences == 1
    assert busy.kv_blocks_used >= 4  # vLLM's count: the prompt's blocks at least
    first.cancel()
    await wait_idle(stubs)
    second_prompt = [(i * 17 + 2) % 500 + 1 for i in range(2 * BLOCK)]
    second = stubs["decode"].Decode(worker_pb2.DecodeRequest(
        model=MODEL, prompt_token_ids=second_prompt, sampling=greedy(max_tokens=CONTEXT - 3 * BLOCK)), timeout=300)
    await second.__aiter__().__anext__()
    after = await load(stubs)
    second.cancel()
    await wait_idle(stubs)
    assert after.active_sequences == 1, "the cancelled sequence still runs in vLLM"
    # The second sequence's 2-3 blocks; the first one's 4+ would show if they were still held.
    assert 2 <= after.kv_blocks_used <= 3


async def test_cancel_while_the_kv_loads_leaves_the_engine_serving(stubs) -> None:
    """A decode cancelled before its first token (its KV may still be loading) is aborted after that token.

    vLLM's engine core can crash on an abort during a KV load, so the engine defers it; either way the
    worker keeps serving and the sequence does not stay in vLLM.
    """
    prompt = [(i * 19 + 5) % 500 + 1 for i in range(3 * BLOCK)]
    for _ in range(3):
        reply = await prefill(stubs["prefill"], prompt, greedy())
        call = stubs["decode"].Decode(worker_pb2.DecodeRequest(
            model=MODEL, prompt_token_ids=prompt, sampling=greedy(max_tokens=CONTEXT - 4 * BLOCK),
            handle=reply.handle, first_token_id=reply.first_token_id), timeout=120)
        call.cancel()
        await wait_idle(stubs)
    after = await decode(stubs, prompt, greedy(), await prefill(stubs["prefill"], prompt, greedy()))
    assert after == await decode(stubs, prompt, greedy())
    busy = stubs["decode"].Decode(worker_pb2.DecodeRequest(
        model=MODEL, prompt_token_ids=prompt, sampling=greedy(max_tokens=CONTEXT - 4 * BLOCK)), timeout=120)
    await busy.__aiter__().__anext__()
    report = await load(stubs)
    busy.cancel()
    await wait_idle(stubs)
    assert report.active_sequences == 1, "a cancelled sequence still runs in vLLM"
