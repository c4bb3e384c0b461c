"""Admission: which requests a worker accepts, and knowing when in-flight work is done.

Pure bookkeeping on the event loop (no I/O): a worker that is draining
refuses new requests with UNAVAILABLE, one that is full refuses with
RESOURCE_EXHAUSTED, and `wait_idle()` lets shutdown and drain finish what
was accepted — an accepted request is never dropped.

Full means either cap: `max_in_flight` requests on the worker, or
`max_per_peer` from one caller (its gRPC peer address, `context.peer()`), so
one caller holding idle streams cannot take every slot from the router. A
RESOURCE_EXHAUSTED refusal is immediate and carries a retry hint
(`Refused.retry_after_s`), never a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

import grpc


class Refused(Exception):
    """A request the worker will not take; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


# What a full worker tells a caller to wait: requests last about this long, a caller can retry elsewhere at once.
FULL_RETRY_AFTER_S = 0.5


class Admission:
    def __init__(self, worker_id: str, max_in_flight: int, max_per_peer: int | None = None) -> None:
        self.worker_id = worker_id
        self.max_in_flight = max_in_flight
        self.max_per_peer = max_in_flight if max_per_peer is None else max_per_peer
        self.in_flight = 0
        self.refused_total = 0
        self._by_peer: Counter[str] = Counter()
        self.draining = False
        self.accepted_total = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def check(self, peer: str = "") -> None:
        """Raises Refused when the worker cannot take one more request (from `peer`) now."""
        if self.draining:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"worker {self.worker_id} is draining and takes no new requests; retry on another worker")
        if self.in_flight >= self.max_in_flight:
            self.refused_total += 1
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"worker {self.worker_id} has {self.in_flight} requests in flight (limit "
                          f"{self.max_in_flight}); retry on another worker or retry after {FULL_RETRY_AFTER_S:g}s",
                          FULL_RETRY_AFTER_S)
        if self._by_peer[peer] >= self.max_per_peer:
            self.refused_total += 1
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"worker {self.worker_id} has {self._by_peer[peer]} requests in flight from this caller "
                          f"(limit {self.max_per_peer} per caller); retry after {FULL_RETRY_AFTER_S:g}s",
                          FULL_RETRY_AFTER_S)

    def in_flight_from(self, peer: str) -> int:
        return self._by_peer[peer]

    @contextlib.contextmanager
    def admit(self, peer: str = "") -> Iterator[None]:
        """Accepts one request from `peer` for the duration of the block (raises Refused first if it cannot)."""
        self.check(peer)
        self.in_flight += 1
        self._by_peer[peer] += 1
        self.accepted_total += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._by_peer[peer] -= 1
            if not self._by_peer[peer]:
                del self._by_peer[peer]  # bounded by callers in flight, not callers ever seen
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
