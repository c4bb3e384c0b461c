"""The Worker service: fast-changing load pushed to routers (never through etcd).

`WatchLoad` sends a report at once, then whenever the load changes (looked at
every `min_interval_ms`: engine state changes without telling anyone), and at
least every `max_interval_ms` as a heartbeat, so a router can tell a quiet
worker from a dead stream.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable

import grpc

from tandem.v1 import worker_pb2, worker_pb2_grpc

DEFAULT_MIN_INTERVAL_MS = 50
DEFAULT_MAX_INTERVAL_MS = 1000


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
    def __init__(self, reporter: LoadReporter) -> None:
        self.reporter = reporter

    async def GetLoad(self, request: worker_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.LoadReport:
        return self.reporter.report()

    async def WatchLoad(self, request: worker_pb2.WatchLoadRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.LoadReport]:
        min_interval = (request.min_interval_ms or DEFAULT_MIN_INTERVAL_MS) / 1000
        max_interval = max(min_interval, (request.max_interval_ms or DEFAULT_MAX_INTERVAL_MS) / 1000)
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
