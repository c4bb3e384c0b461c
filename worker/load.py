"""The Worker service: fast-changing load pushed to routers (never through etcd).

`WatchLoad` sends a report at once, then whenever the load changes (looked at
every `min_interval_ms`: engine state changes without telling anyone), and at
least every `max_interval_ms` as a heartbeat, so a router can tell a quiet
worker from a dead stream.

Bounded: a requested `min_interval_ms` below the worker's floor
(`--min-load-interval-ms`, 50 ms by default) is raised to the floor, not
refused: a router asking for more than it can get still gets a working stream
(reports as fast as the worker allows), and a caller asking for 1 ms gains
nothing — each stream costs at most one snapshot per floor interval. At most
`max_watchers` streams are open at once; one more is answered
RESOURCE_EXHAUSTED with a retry hint at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable

import grpc

from tandem.v1 import worker_pb2, worker_pb2_grpc
from worker.admission import Refused
from worker.errors import retry_hint

DEFAULT_MIN_INTERVAL_MS = 50
DEFAULT_MAX_INTERVAL_MS = 1000
# A refused watcher retries after this; streams live long, so a slot frees rarely.
WATCHERS_FULL_RETRY_AFTER_S = 5.0


class LoadReporter:
    """Builds LoadReports from a snapshot function; numbers them monotonically."""

    def __init__(self, snapshot: Callable[[], worker_pb2.LoadReport]) -> None:
        self._snapshot = snapshot
        self._sequence = itertools.count(1)

    def report(self) -> worker_pb2.LoadReport:
        report = self._snapshot()
        report.sequence = next(self._sequence)
        report.at_unix_ms = int(time.time() * 1000)
        return report


def _content(report: worker_pb2.LoadReport) -> bytes:
    """The report without its sequence and timestamp, to tell a change from a heartbeat."""
    copy = worker_pb2.LoadReport()
    copy.CopyFrom(report)
    copy.ClearField("sequence")
    copy.ClearField("at_unix_ms")
    return copy.SerializeToString(deterministic=True)


class WorkerLoadServicer(worker_pb2_grpc.WorkerServicer):
    """GetLoad and WatchLoad; may serve many streams concurrently on one event loop."""

    def __init__(self, reporter: LoadReporter, *, min_interval_ms: int = DEFAULT_MIN_INTERVAL_MS,
                 max_watchers: int = 64) -> None:
        self.reporter = reporter
        self.min_interval_ms = min_interval_ms
        self.max_watchers = max_watchers
        self.watchers = 0
        self.refused_total = 0

    def intervals(self, request: worker_pb2.WatchLoadRequest) -> tuple[float, float]:
        """(min, max) seconds between reports for `request`: its asks, the min raised to the worker's floor."""
        min_interval = max(self.min_interval_ms, request.min_interval_ms or DEFAULT_MIN_INTERVAL_MS) / 1000
        max_interval = max(min_interval, (request.max_interval_ms or DEFAULT_MAX_INTERVAL_MS) / 1000)
        return min_interval, max_interval

    async def GetLoad(self, request: worker_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.LoadReport:
        return self.reporter.report()

    async def WatchLoad(self, request: worker_pb2.WatchLoadRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.LoadReport]:
        if self.watchers >= self.max_watchers:
            self.refused_total += 1
            refused = Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self.watchers} WatchLoad streams are open on this worker (limit "
                              f"{self.max_watchers}); retry after {WATCHERS_FULL_RETRY_AFTER_S:g}s",
                              WATCHERS_FULL_RETRY_AFTER_S)
            await context.abort(refused.code, refused.message, retry_hint(refused))
        self.watchers += 1
        try:
            async for report in self._watch(request):
                yield report
        finally:
            self.watchers -= 1

    async def _watch(self, request: worker_pb2.WatchLoadRequest) -> AsyncIterator[worker_pb2.LoadReport]:
        min_interval, max_interval = self.intervals(request)
        report = self.reporter.report()
        last_content, last_sent = _content(report), time.monotonic()
        yield report
        while True:
            await asyncio.sleep(min_interval)
            report = self.reporter.report()
            content = _content(report)
            now = time.monotonic()
            if content != last_content or now - last_sent >= max_interval:
                last_content, last_sent = content, now
                yield report
