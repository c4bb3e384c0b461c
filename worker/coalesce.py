"""Coalescing decode steps: send what accumulated while the last send was in flight.

The engine produces steps at its own pace; the gRPC stream sends them at the
network's. `coalesced(steps)` runs the engine side in its own task and hands
the writer every step that is ready, merged into one: when the writer keeps
up (a real GPU, a token every few milliseconds) each step goes alone and
nothing waits; when it falls behind (a busy router, a fast simulated engine)
several steps travel in one message instead of queueing up.

With `hold_s` > 0, every message after the first waits until `hold_s` has
passed since the previous one (or the sequence ends) and takes every step
produced meanwhile: a caller that only wants the whole answer gets a few
messages instead of one per token, and the first still leaves at once.

Closing the returned generator (the client cancelled) cancels the engine
side, which closes the engine's iterator and frees the sequence. So does
`interrupt` failing (a role switch hands the stream over): the writer then
raises its exception instead of sending the steps still queued, at once,
even while it waits for the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from engine.base import DecodeStep
from runtime.tasks import cancel_and_wait

_END = object()


async def coalesced(steps: AsyncGenerator[DecodeStep, None], hold_s: float = 0.0,
                    interrupt: asyncio.Future[None] | None = None) -> AsyncGenerator[DecodeStep, None]:
    queue: asyncio.Queue[object] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def interrupted(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            # The writer raises it when it reaches it: steps merged with it are not sent.
            queue.put_nowait(future.exception())

    async def pump() -> None:
        try:
            async with contextlib.aclosing(steps):
                async for step in steps:
                    queue.put_nowait(step)
        except Exception as exc:  # handed to the writer, which raises it in the RPC's task
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    task = loop.create_task(pump())
    if interrupt is not None:
        interrupt.add_done_callback(interrupted)
    sent_at: float | None = None
    try:
        while True:
            items = [await queue.get()]
            if hold_s > 0 and sent_at is not None:
                # Hold until hold_s after the last send, unless the sequence ends first. (asyncio.timeout,
                # not wait_for: on 3.11 wait_for can swallow a cancellation that lands as the get completes,
                # and a cancelled RPC must end now.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(sent_at + hold_s):
                        while items[-1] is not _END and not isinstance(items[-1], BaseException):
                            items.append(await queue.get())
            while not queue.empty():
                items.append(queue.get_nowait())
            merged: DecodeStep | None = None
            for item in items:
                if item is _END:
                    if merged is not None:
                        yield merged
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, DecodeStep)
                if merged is None:
                    merged = DecodeStep(list(item.token_ids), item.finish_reason, item.prefill_s, item.queue_s)
                else:
                    merged.token_ids.extend(item.token_ids)
                    merged.finish_reason = item.finish_reason
            if merged is not None:
                yield merged
                sent_at = loop.time()
    finally:
        if interrupt is not None:
            interrupt.remove_done_callback(interrupted)
        await cancel_and_wait(task)
