"""Decode-step coalescing: nothing lost, nothing reordered, merged only when the writer falls behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import pytest

from engine.base import DecodeStep
from worker.coalesce import coalesced


async def engine_steps(n: int, gate: asyncio.Event | None = None, closed: list[bool] | None = None,
                       fail_at: int = -1) -> AsyncGenerator[DecodeStep, None]:
    try:
        for i in range(n):
            if gate is not None:
                await gate.wait()
                gate.clear()
            if i == fail_at:
                raise RuntimeError("engine failed")
            yield DecodeStep([i], "length" if i == n - 1 else None, prefill_s=0.5 if i == 0 else 0.0)
            await asyncio.sleep(0)
    finally:
        if closed is not None:
            closed.append(True)


async def test_a_slow_writer_gets_merged_steps_in_order() -> None:
    out: list[DecodeStep] = []
    async for step in coalesced(engine_steps(50)):
        out.append(step)
        await asyncio.sleep(0.001)  # a writer slower than the engine
    assert [t for s in out for t in s.token_ids] == list(range(50))
    assert len(out) < 50, "steps that piled up while the writer was busy travel together"
    assert out[0].prefill_s == 0.5 and out[-1].finish_reason == "length"
    assert all(s.finish_reason is None for s in out[:-1])


async def test_a_fast_writer_gets_every_step_alone() -> None:
    gate = asyncio.Event()
    out: list[list[int]] = []
    stream = coalesced(engine_steps(5, gate))
    for _ in range(5):
        gate.set()
        out.append((await anext(stream)).token_ids)
    assert out == [[0], [1], [2], [3], [4]]
    await stream.aclose()


async def test_closing_early_closes_the_engine_iterator() -> None:
    closed: list[bool] = []
    stream = coalesced(engine_steps(1000, closed=closed))
    await anext(stream)
    await stream.aclose()
    assert closed == [True]


async def test_engine_errors_reach_the_writer() -> None:
    with pytest.raises(RuntimeError, match="engine failed"):
        async with contextlib.aclosing(coalesced(engine_steps(10, fail_at=3))) as stream:
            async for _ in stream:
                pass


async def test_a_held_stream_sends_the_first_step_then_the_rest_together() -> None:
    """flush_interval_ms for a caller that answers at the end: one message for the first token (the
    time to first token stays honest), then everything produced within the hold, in order."""
    async def paced(n: int) -> AsyncGenerator[DecodeStep, None]:
        for i in range(n):
            yield DecodeStep([i], "length" if i == n - 1 else None)
            await asyncio.sleep(0.001)  # an engine slower than the writer: unheld, one message per step

    unheld = [step async for step in coalesced(paced(30))]
    held = [step async for step in coalesced(paced(30), hold_s=30.0)]
    assert [t for s in held for t in s.token_ids] == list(range(30))
    assert len(unheld) > 2 and len(held) == 2
    assert held[0].token_ids == [0] and held[-1].finish_reason == "length"


async def test_a_held_stream_closed_while_holding_frees_the_engine() -> None:
    """The client went away during the hold: the engine's iterator is closed (its sequence freed) at once,
    not when the hold would have ended."""
    closed: list[bool] = []

    async def endless() -> AsyncGenerator[DecodeStep, None]:
        try:
            i = 0
            while True:
                yield DecodeStep([i], None)
                i += 1
                await asyncio.sleep(0.001)
        finally:
            closed.append(True)

    stream = coalesced(endless(), hold_s=3600.0)
    assert (await anext(stream)).token_ids == [0]
    second = asyncio.ensure_future(anext(stream))  # now inside the hour-long hold
    await asyncio.sleep(0.01)
    second.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await second
    await stream.aclose()
    assert closed == [True]
