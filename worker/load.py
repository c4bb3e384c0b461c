"""The Worker service: fast-changing load pushed to routers (never through etcd).

`WatchLoad` sends a report at once, then whenever the load changes (looked at
every `min_interval_ms`: engine state changes without telling anyone), and at
least every `max_interval_ms` as a heartbeat, so a router can tell a quiet
worker from a dead stream. After a change it sends SETTLE_REPORTS more
reports, one per interval, so a router learns soon that the load settled.

Bounded: a requested `min_interval_ms` below the worker's floor
(`--min-load-interval-ms`, 50 ms by default) is raised to the floor, not
refused: a router asking for more than it can get still gets a working stream
(reports as fast as the worker allows), and a caller asking for 1 ms gains
nothing — each stream costs at most one snapshot per floor interval. At most
`max_watchers` streams are open at once; one more is answered
RESOURCE_EXHAUSTED with a retry hint at once.

Prefix-cache events ride on the same stream, for subscribers that ask
(`WatchLoadRequest.kv_events`) when the engine has a prefix cache: the
first report carries a snapshot of every block hash held, later ones what
changed since the report before (engine.kv_events), numbered so a
subscriber can tell it missed some. A subscriber slower than the engine's
bounded event log gets a fresh snapshot instead. One stream per router and
worker carries both: the events change exactly when the load does (a
prefill stores blocks), and a second stream would double the connections,
keepalives and reconnect logic of a thousand-worker fleet for no gain.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable

import grpc

from engine.kv_events import KvDelta, KvEventLog
from tandem.v1 import worker_pb2, worker_pb2_grpc
from worker.admission import Refused
from worker.errors import retry_hint

DEFAULT_MIN_INTERVAL_MS = 50
DEFAULT_MAX_INTERVAL_MS = 1000
# Reports sent after the last change even when nothing changed: a router counts its own recent decisions
# into a worker's load until a report two intervals later shows them (router_svc.inflight), and a quiet
# worker would otherwise leave them counted until the heartbeat (work done in a few ms held as queued).
SETTLE_REPORTS = 2
# Hashes in one snapshot at most (8 bytes each: 3.2 MB, under gRPC's default 4 MB message limit on the
# router's side). A larger cache sends its most recently stored blocks; the router misses only older ones.
MAX_SNAPSHOT_BLOCKS = 400_000
# A refused watcher retries after this; streams live long, so a slot frees rarely.
WATCHERS_FULL_RETRY_AFTER_S = 5.0


class LoadReporter:
    """Builds LoadReports from a snapshot function; numbers them monotonically.

    `kv_events` returns the engine's event log (Engine.kv_events), or None
    while it has none (not started, or no prefix cache)."""

    def __init__(self, snapshot: Callable[[], worker_pb2.LoadReport],
                 kv_events: Callable[[], KvEventLog | None] = lambda: None) -> None:
        self._snapshot = snapshot
        self._sequence = itertools.count(1)
        self.kv_events = kv_events

    def report(self) -> worker_pb2.LoadReport:
        report = self._snapshot()
        report.sequence = next(self._sequence)
        report.at_unix_ms = int(time.time() * 1000)
        return report


def kv_events_to_pb(delta: KvDelta, out: worker_pb2.KvEvents) -> None:
    out.block_size = delta.block_size
    out.snapshot = delta.snapshot
    out.since_seq = delta.since_seq
    out.last_seq = delta.last_seq
    out.stored.extend(delta.stored)
    out.removed.extend(delta.removed)


class KvCursor:
    """One subscriber's place in the engine's event log: what its next report must carry."""

    def __init__(self, kv_events: Callable[[], KvEventLog | None]) -> None:
        self._kv_events = kv_events
        self.last_seq: int | None = None

    def fill(self, report: worker_pb2.LoadReport) -> None:
        """Adds the events since the last filled report (a snapshot the first time, or after falling behind)."""
        log = self._kv_events()
        if log is None:
            return
        delta = None if self.last_seq is None else log.delta_since(self.last_seq)
        if delta is None:
            delta = log.snapshot(MAX_SNAPSHOT_BLOCKS)
        if delta.empty:
            return
        kv_events_to_pb(delta, report.kv_events)
        self.last_seq = delta.last_seq


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
        report = self.reporter.report()
        if request.kv_snapshot:
            KvCursor(self.reporter.kv_events).fill(report)
        return report

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
        cursor = KvCursor(self.reporter.kv_events if request.kv_events else lambda: None)
        report = self.reporter.report()
        cursor.fill(report)
        last_content, last_sent = _content(report), time.monotonic()
        settling = 0
        yield report
        while True:
            await asyncio.sleep(min_interval)
            report = self.reporter.report()
            # Events make the content differ, so a report that carries some is always sent.
            cursor.fill(report)
            content = _content(report)
            now = time.monotonic()
            changed = content != last_content
            if changed or settling or now - last_sent >= max_interval:
                settling = SETTLE_REPORTS if changed else max(0, settling - 1)
                last_content, last_sent = content, now
                yield report
