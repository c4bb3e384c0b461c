"""Coalescing over the sim engine's own stream (read without a pump task): the same promises as any engine's."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import grpc
import pytest

from engine.base import DecodeRequest, EngineConfig, EngineError, FinishReason, InvalidRequest, Sampling
from engine.sim import SimEngine
from tests.support.sim_engine import sim
from worker.admission import Refused
from worker.coalesce import coalesced

PROMPT = tuple(range(1000, 1040))


def request(name: str, max_tokens: int = 40, prompt: tuple[int, ...] = PROMPT) -> DecodeRequest:
    return DecodeRequest(name, prompt, Sampling(max_tokens=max_tokens, ignore_eos=True))


async def test_held_and_unheld_streams_carry_the_engines_tokens_in_order() -> None:
    async with sim() as engine:
        alone = [t async for step in engine.decode(request("a")) for t in step.token_ids]
        unheld = [step async for step in coalesced(engine.decode(request("b")))]
        held = [step async for step in coalesced(engine.decode(request("c")), hold_s=30.0)]
    assert len(alone) == 40
    assert [t for s in unheld for t in s.token_ids] == alone
    assert [t for s in held for t in s.token_ids] == alone
    assert len(held) == 2 and len(held[0].token_ids) == 1, "the first token at once, then the rest together"
    assert held[-1].finish_reason == unheld[-1].finish_reason == FinishReason.LENGTH
    assert held[0].prefill_s > 0 and unheld[0].prefill_s > 0


async def test_a_writer_cancelled_while_holding_frees_the_sequence_at_once() -> None:
    async with sim(speedup=1.0) as engine:  # real time: 40 tokens take far longer than the test
        stream = coalesced(engine.decode(request("a", max_tokens=4000)), hold_s=3600.0)
        assert len((await anext(stream)).token_ids) == 1
        second = asyncio.ensure_future(anext(stream))  # now inside the hour-long hold
        await asyncio.sleep(0.05)
        assert engine.stats().active_sequences == 1
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        await stream.aclose()


async def test_closing_after_the_first_step_frees_the_sequence() -> None:
    async with sim(speedup=1.0) as engine:
        stream = coalesced(engine.decode(request("a", max_tokens=4000)))
        await anext(stream)
        await stream.aclose()


async def test_a_refused_request_raises_at_the_first_message() -> None:
    async with sim(max_context_tokens=64) as engine:
        with pytest.raises(InvalidRequest, match="context limit is 64"):
            await anext(coalesced(engine.decode(request("a", prompt=tuple(range(64))))))


async def test_a_request_with_no_room_ends_at_once_with_its_reason() -> None:
    async with sim(max_context_tokens=64) as engine:
        steps = [s async for s in coalesced(engine.decode(DecodeRequest(
            "a", tuple(range(60)), Sampling(max_tokens=10, ignore_eos=True), generated=(1, 2, 3, 4))), hold_s=1.0)]
    assert [s.token_ids for s in steps] == [[]] and steps[0].finish_reason == FinishReason.CONTEXT_FULL


async def test_an_engine_failure_reaches_a_holding_writer() -> None:
    engine = SimEngine(EngineConfig(model="llama-3-8b", gpu_type="H100-SXM", speedup=1.0))
    await engine.start()
    stream = coalesced(engine.decode(request("a", max_tokens=4000)), hold_s=3600.0)
    await anext(stream)
    second = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    await engine.close()
    with pytest.raises(EngineError, match="closed"):
        await second
    await stream.aclose()


async def test_a_hand_over_ends_a_holding_writer_at_once() -> None:
    async with sim(speedup=1.0) as engine:
        handover: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream = coalesced(engine.decode(request("a", max_tokens=4000)), hold_s=3600.0, interrupt=handover)
        await anext(stream)
        second = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        handover.set_exception(Refused(grpc.StatusCode.UNAVAILABLE, "handed over"))
        with pytest.raises(Refused, match="handed over"):
            await second
        await stream.aclose()


async def test_a_cancelled_reader_of_the_engine_stream_frees_the_sequence() -> None:
    """The sim's stream behaves as an async generator: a cancellation thrown into a waiting read ends it."""
    async with sim(speedup=1.0) as engine:
        stream = engine.decode(request("a", max_tokens=4000))
        await anext(stream)
        reader = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the reader waits for the next step (milliseconds away at speedup 1)
        assert not reader.done()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        assert engine.stats().active_requests == 0
        with pytest.raises(StopAsyncIteration):
            await anext(stream)


async def test_a_started_stream_dropped_unclosed_frees_the_sequence() -> None:
    """As an async generator's finalizer would: the reader forgot aclose(), the KV is freed anyway."""
    async with sim(speedup=1.0) as engine:
        stream = engine.decode(request("a", max_tokens=4000))
        await anext(stream)
        assert engine.stats().active_requests == 1
        del stream
        gc.collect()
        await asyncio.sleep(0)
        assert engine.stats().active_requests == 0
