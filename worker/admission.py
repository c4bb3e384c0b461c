"""Admission: which requests a worker accepts, and knowing when in-flight work is done.

Pure bookkeeping on the event loop (no I/O): a worker that is draining
refuses new requests with UNAVAILABLE, one that is full refuses with
RESOURCE_EXHAUSTED, and `wait_idle()` lets shutdown and drain finish what
was accepted — an accepted request is never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc


class Refused(Exception):
    """A request the worker will not take; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Admission:
    def __init__(self, worker_id: str, max_in_flight: int) -> None:
        self.worker_id = worker_id
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.draining = False
        self.accepted_total = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def check(self) -> None:
        """Raises Refused when the worker cannot take one more request now."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"worker {self.worker_id} is draining and takes no new requests; retry on another worker")
        if self.in_flight >= self.max_in_flight:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"worker {self.worker_id} has {self.in_flight} requests in flight (limit "
                          f"{self.max_in_flight}); retry on another worker or after a short backoff")

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Accepts one request for the duration of the block (raises Refused first if it cannot)."""
        self.check()
        self.in_flight += 1
        self.accepted_total += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def start_draining(self) -> None:
        self.draining = True

    def stop_draining(self) -> None:
        self.draining = False

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no request is in flight; False if some still are after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
