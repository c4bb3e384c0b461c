"""The steps of one sim decode sequence, as `SimEngine.decode` returns them.

An async generator in all but implementation: the sequence starts at the
first `__anext__` (a refused request raises there), `aclose()` frees it at
once (safe twice), and an exception thrown into a waiting `__anext__` (the
reader was cancelled) ends the stream and frees the sequence too, as does
dropping a started stream unclosed (on the next loop turn, as an async
generator's finalizer would). Each `__anext__` returns every token produced
since the previous one, as one step.

The engine's step loop buffers each token here as it is drawn, so nobody
needs to read between steps. A reader that wants to sleep until there is
something worth sending (worker.coalesce) uses `watch()` and `take_steps()`
instead of `__anext__`: told of each token, it takes them when it chooses,
and needs no task of its own.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

from engine.base import DecodeStep
from engine.sim.scheduler import Produced
from engine.sim.sequence import Sequence

# What the engine's step loop calls with each token drawn for the sequence (or the failure that ends it).
Sink = Callable[[Produced | BaseException], None]


class DecodeStream(AsyncGenerator[DecodeStep, None]):
    """See the module docstring. Built by the engine with its three hooks for this request:

    `begin(sink)` checks the request, builds and queues its sequence (raising what the request is
    refused with) and returns it, with a finish reason when nothing may be generated at all (the
    sequence is then not queued); `retire(seq)` ends it in the engine whatever happened (safe twice);
    `first_times(seq)` is (queue_s, prefill_s) for the first step.
    """

    def __init__(self, begin: Callable[[Sink], tuple[Sequence, str | None]], retire: Callable[[Sequence], None],
                 first_times: Callable[[Sequence], tuple[float, float]]) -> None:
        self._begin = begin
        self._retire = retire
        self._first_times = first_times
        self._seq: Sequence | None = None
        self._items: list[Produced | BaseException] = []
        self._ended = False
        self._first = True
        self._waiter: asyncio.Future[None] | None = None
        self._watcher: Callable[[bool], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __del__(self) -> None:
        # Dropped unclosed: free the sequence from the loop, not from inside whatever the collector interrupted.
        if not self._ended and self._seq is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon(self._retire, self._seq)

    @property
    def ended(self) -> bool:
        """True once the last step was taken, the sequence failed, or the stream was closed."""
        return self._ended

    def watch(self, callback: Callable[[bool], object] | None) -> None:
        """Calls `callback(last)` for each token the engine produces from now on (on the event loop, inside
        its step): `last` when it ends the sequence, or the sequence failed. None stops the calls."""
        self._watcher = callback

    def take_steps(self) -> DecodeStep | None:
        """Every token produced since the last take, as one step; None when none is (or the stream ended).

        The first call starts the sequence and raises what the request is refused with; a call that
        reaches the sequence's failure raises it. Either ends the stream.
        """
        if self._ended:
            return None
        if self._seq is None:
            self._loop = asyncio.get_running_loop()
            try:
                self._seq, reason = self._begin(_weak_sink(self))
            except BaseException:
                self._ended = True
                raise
            if reason is not None:
                self._end()
                return DecodeStep(token_ids=[], finish_reason=reason)
        if not self._items:
            return None
        items, self._items = self._items, []
        tokens: list[int] = []
        reason = None
        for item in items:
            if isinstance(item, BaseException):
                self._end()
                raise item
            tokens.append(item.token)
            reason = item.finish_reason
        step = DecodeStep(token_ids=tokens, finish_reason=reason)
        if self._first:
            self._first = False
            step.queue_s, step.prefill_s = self._first_times(self._seq)
        if reason is not None:
            self._end()
        return step

    async def __anext__(self) -> DecodeStep:
        while True:
            step = self.take_steps()
            if step is not None:
                return step
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except BaseException:
                # Thrown in while waiting (a cancellation): the stream ends, as an async generator would.
                self._end()
                raise
            finally:
                self._waiter = None

    async def asend(self, value: None) -> DecodeStep:
        return await self.__anext__()

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> DecodeStep:
        self._end()
        raise typ if val is None else val

    async def aclose(self) -> None:
        """Frees the sequence now. Safe twice, and before the first step."""
        self._end()

    def _put(self, item: Produced | BaseException) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._watcher is not None:
            self._watcher(isinstance(item, BaseException) or item.finish_reason is not None)

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._watcher = None
            if self._seq is not None:
                self._retire(self._seq)


def _weak_sink(stream: DecodeStream) -> Sink:
    """`stream`'s sink, holding it weakly: the engine keeps the sequence, and a stream its reader dropped
    must still be collectable (its __del__ frees the sequence)."""
    ref = weakref.ref(stream)

    def sink(item: Produced | BaseException) -> None:
        live = ref()
        if live is not None:
            live._put(item)

    return sink
