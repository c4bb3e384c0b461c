"""Stall detection for decode streams: one watchdog for all of them.

A decode worker that stops sending (SIGSTOP, a wedged engine, a partition
the keepalive has not noticed yet) must not hold a request forever. Timing
every read with its own timer costs a timer per token; instead each stream
`touch()`es a timestamp as steps arrive and one background task cancels the
streams that have been silent for longer than the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator

import grpc


class Watched:
    """One stream under watch. `stalled` is set when the watchdog cancelled it."""

    __slots__ = ("call", "last", "stalled")

    def __init__(self, call: grpc.aio.Call) -> None:
        self.call = call
        self.last = time.monotonic()
        self.stalled = False

    def touch(self) -> None:
        self.last = time.monotonic()


class StallWatch:
    """Cancels watched calls silent for longer than `timeout_s`. Use from one event loop."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._watched: dict[int, Watched] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watch(self, call: grpc.aio.Call) -> Iterator[Watched]:
        """Watches `call` for the block; yields the Watched to touch on every step."""
        key = next(self._ids)
        watched = self._watched[key] = Watched(call)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="decode-stall-watch")
        try:
            yield watched
        finally:
            del self._watched[key]

    async def _run(self) -> None:
        # Checking four times per timeout bounds detection at 1.25 x the timeout.
        while self._watched:
            await asyncio.sleep(self.timeout_s / 4)
            deadline = time.monotonic() - self.timeout_s
            for watched in list(self._watched.values()):
                if watched.last < deadline and not watched.stalled:
                    watched.stalled = True
                    watched.call.cancel()
