"""Coalescing decode steps: send what accumulated while the last send was in flight.

The engine produces steps at its own pace; the gRPC stream sends them at the
network's. `coalesced(steps)` hands the writer every step that is ready,
merged into one: when the writer keeps up (a real GPU, a token every few
milliseconds) each step goes alone and nothing waits; when it falls behind
(a busy router, a fast simulated engine) several steps travel in one message
instead of queueing up.

With `hold_s` > 0, every message after the first waits until `hold_s` has
passed since the previous one (or the sequence ends) and takes every step
produced meanwhile: a caller that only wants the whole answer gets a few
messages instead of one per token, and the first still leaves at once. The
writer sleeps through the hold: it is woken by the end, not by each step.

The engine side: an engine's steps iterator is read by a task of its own
(the pump), which merges steps as they come. One that buffers its engine's
steps itself (`BufferedSteps`, the sim engine's) is read without a task: it
tells the writer of each step, and the writer takes them when it sends.

Closing the returned generator (the client cancelled) closes the engine's
iterator, which frees the sequence. So does `interrupt` failing (a role
switch hands the stream over): the writer then raises its exception instead
of sending the steps still pending, at once, even while it waits for the
engine or holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Protocol, cast

from engine.base import DecodeStep
from runtime.tasks import cancel_and_wait


class BufferedSteps(Protocol):
    """A steps iterator that keeps its engine's steps until they are taken, with nobody reading between
    steps (engine.sim.decode_stream.DecodeStream). `coalesced` recognises one by `take_steps`."""

    @property
    def ended(self) -> bool:
        """True once the last step was taken (or the sequence failed, or the stream was closed)."""

    def take_steps(self) -> DecodeStep | None:
        """Every step produced since the last take, merged; None when there is none. The first call starts
        the sequence; raises what the engine fails the sequence with."""

    def watch(self, callback: Callable[[bool], object] | None) -> None:
        """Calls `callback(last)` for each step produced (`last`: it ends the sequence, or failed it)."""

    async def aclose(self) -> None:
        """Frees the sequence. Safe twice."""


class _Pending:
    """Whether the writer has something to take, and its one waiter.

    Woken by the end, an error, or, while `wake_on_step`, any step: a writer
    that holds leaves it False and is not woken once per step. For a pumped
    iterator it also keeps the steps produced so far, merged into `step`.
    """

    __slots__ = ("_waiter", "ended", "error", "has_step", "step", "wake_on_step")

    def __init__(self) -> None:
        self.step: DecodeStep | None = None
        self.has_step = False
        self.ended = False
        self.error: BaseException | None = None
        self.wake_on_step = True
        self._waiter: asyncio.Future[None] | None = None

    def put(self, step: DecodeStep) -> None:
        """A pumped step: merged into the one waiting to be sent."""
        merged = self.step
        if merged is None:
            # A copy: later steps extend it, and the engine's list is the engine's.
            self.step = DecodeStep(list(step.token_ids), step.finish_reason, step.prefill_s, step.queue_s)
        else:
            merged.token_ids.extend(step.token_ids)
            merged.finish_reason = step.finish_reason
        self.arrived(False)

    def take(self) -> DecodeStep | None:
        step, self.step = self.step, None
        self.has_step = False
        return step

    def arrived(self, last: bool) -> None:
        """A step is there to take; `last`: nothing comes after it."""
        self.has_step = True
        if last:
            self.end()
        elif self.wake_on_step:
            self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def flush(self) -> None:
        """The hold is over: any step wakes the writer from now on, and one already here does now."""
        self.wake_on_step = True
        if self.has_step:
            self._wake()

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Returns once the writer has something to do; a cancellation of the writer propagates at once."""
        while not (self.ended or self.error is not None or (self.wake_on_step and self.has_step)):
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def coalesced(steps: AsyncGenerator[DecodeStep, None], hold_s: float = 0.0,
              interrupt: asyncio.Future[None] | None = None) -> AsyncGenerator[DecodeStep, None]:
    """The writer's view of `steps` (module docstring); close it to free the sequence."""
    if hasattr(steps, "take_steps"):
        return _buffered(cast(BufferedSteps, steps), hold_s, interrupt)
    return _pumped(steps, hold_s, interrupt)


async def _pumped(steps: AsyncGenerator[DecodeStep, None], hold_s: float,
                  interrupt: asyncio.Future[None] | None) -> AsyncGenerator[DecodeStep, None]:
    pending = _Pending()

    async def pump() -> None:
        try:
            async with contextlib.aclosing(steps):
                async for step in steps:
                    pending.put(step)
        except Exception as exc:  # handed to the writer, which raises it in the RPC's task
            pending.fail(exc)
        finally:
            pending.end()

    task = asyncio.get_running_loop().create_task(pump())
    try:
        async with contextlib.aclosing(_write(pending, pending.take, hold_s, interrupt)) as messages:
            async for step in messages:
                yield step
    finally:
        if not task.done():  # usually done: it ended the stream (waiting on a done task costs a loop turn)
            await cancel_and_wait(task)


async def _buffered(steps: BufferedSteps, hold_s: float,
                    interrupt: asyncio.Future[None] | None) -> AsyncGenerator[DecodeStep, None]:
    pending = _Pending()
    pending.has_step = True  # the first take starts the sequence

    def take() -> DecodeStep | None:
        pending.has_step = False
        step = steps.take_steps()
        if steps.ended:  # also when no step announced it: a request that may generate nothing ends at its start
            pending.ended = True
        return step

    steps.watch(pending.arrived)
    try:
        async with contextlib.aclosing(_write(pending, take, hold_s, interrupt)) as messages:
            async for step in messages:
                yield step
    finally:
        steps.watch(None)
        await steps.aclose()


async def _write(pending: _Pending, take: Callable[[], DecodeStep | None], hold_s: float,
                 interrupt: asyncio.Future[None] | None) -> AsyncGenerator[DecodeStep, None]:
    """The writer's side: each message once something is ready (after the hold, with `hold_s`)."""
    loop = asyncio.get_running_loop()

    def interrupted(future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            # The writer raises it when it wakes: steps pending with it are not sent.
            pending.fail(error)

    if interrupt is not None:
        interrupt.add_done_callback(interrupted)
    timer: asyncio.TimerHandle | None = None
    try:
        while True:
            await pending.wait(loop)
            if pending.error is not None:
                raise pending.error
            step = take()
            if step is None:
                if pending.ended:  # everything sent
                    return
                continue
            yield step
            if hold_s > 0 and not pending.ended:
                # Hold until hold_s after this send (a timer, not asyncio.timeout: nothing to cancel on each
                # wake, and a cancelled RPC still ends at once).
                pending.wake_on_step = False
                timer = loop.call_at(loop.time() + hold_s, pending.flush)
                await pending.wait(loop)
                timer.cancel()
                timer = None
                pending.wake_on_step = True
    finally:
        if timer is not None:
            timer.cancel()
        if interrupt is not None:
            interrupt.remove_done_callback(interrupted)
