"""WatchLoad subscriptions: the router's live load figures for every worker in view.

One background task per worker streams its LoadReports (reconnecting with
backoff) and keeps the latest as a policy `Load`, stamped with the router's
own monotonic clock. A worker that leaves the registry loses its task; a
stream that breaks keeps the last figures, which age, and the policy's
stale-load penalty does the rest.

With `on_kv`, the streams also ask for the workers' prefix-cache events
(worker.load): each report's events go to `on_kv(worker_id, events or None,
first report of the stream)`, and when it answers False (a gap in the
event sequence) the stream is reopened at once, to start over from a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

import grpc

from router_svc.candidates import Load
from router_svc.candidates_pb import load_from_pb
from runtime.channels import ChannelPool
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class LoadTracker:
    """Latest Load per worker id. `follow()`/`unfollow()` from the event loop; `close()` safe twice."""

    def __init__(self, channels: ChannelPool, *, min_interval_ms: int = 50, max_interval_ms: int = 1000,
                 on_update: Callable[[str], None] = lambda worker_id: None,
                 on_kv: Callable[[str, worker_pb2.KvEvents | None, bool], bool] | None = None) -> None:
        self.channels = channels
        self._on_kv = on_kv
        # Streams reopened because the event sequence had a gap.
        self.resyncs_total = 0
        self.min_interval_ms = min_interval_ms
        self.max_interval_ms = max_interval_ms
        self.loads: dict[str, Load] = {}
        self._on_update = on_update
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._identities: dict[str, str] = {}
        self._users: Counter[str] = Counter()

    def follow(self, worker_id: str, endpoint: str, identity: str = "") -> None:
        """Subscribes to `worker_id` at `endpoint` (a no-op when already so); O(1), so a registry change
        costs the same with ten workers or ten thousand.

        `identity` (runtime.peers.peer_identity of its record) is what the worker's certificate must name
        when the channel pool checks identities. A worker that moved or was renamed is resubscribed."""
        current = self._tasks.get(worker_id)
        if current is not None and current[0] == endpoint and self._identities.get(worker_id, "") == identity:
            return
        self.unfollow(worker_id)
        self._identities[worker_id] = identity
        task = asyncio.create_task(self._follow(worker_id, endpoint, identity), name=f"watch-load-{worker_id}")
        self._tasks[worker_id] = (endpoint, task)
        self._users[endpoint] += 1

    def unfollow(self, worker_id: str) -> None:
        """Ends the subscription to `worker_id` and drops its figures (it left, or cannot take work yet)."""
        current = self._tasks.pop(worker_id, None)
        self._identities.pop(worker_id, None)
        if current is not None:
            endpoint, task = current
            task.cancel()
            self.loads.pop(worker_id, None)
            self._users[endpoint] -= 1
            if not self._users[endpoint]:
                del self._users[endpoint]

    def endpoint_of(self, worker_id: str) -> str:
        """The endpoint `worker_id` is followed at ('' when it is not)."""
        current = self._tasks.get(worker_id)
        return current[0] if current is not None else ""

    def followed_at(self, endpoint: str) -> int:
        """How many workers are followed at `endpoint`."""
        return self._users.get(endpoint, 0)

    def __len__(self) -> int:
        return len(self._tasks)

    def forget(self, worker_id: str) -> None:
        """Drops a worker's figures now (it failed a request): it is unknown until its next report."""
        if self.loads.pop(worker_id, None) is not None:
            self._on_update(worker_id)

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, worker_id: str, endpoint: str, identity: str = "") -> None:
        backoff = 0.1
        on_kv = self._on_kv
        request = worker_pb2.WatchLoadRequest(min_interval_ms=self.min_interval_ms,
                                              max_interval_ms=self.max_interval_ms, kv_events=on_kv is not None)
        while True:
            stub = worker_pb2_grpc.WorkerStub(self.channels.get(endpoint, identity))
            call = stub.WatchLoad(request)
            first = True
            try:
                async for report in call:
                    self.loads[worker_id] = load_from_pb(report, time.monotonic())
                    self._on_update(worker_id)
                    backoff = 0.1
                    if on_kv is not None:
                        events = report.kv_events if report.HasField("kv_events") else None
                        synced = on_kv(worker_id, events, first)
                        first = False
                        if not synced:
                            log.info("prefix-cache events from %s skipped some; resubscribing for a snapshot",
                                     worker_id)
                            self.resyncs_total += 1
                            backoff = 0.0  # a new stream starts with a snapshot: reopen at once
                            break
            except grpc.aio.AioRpcError as exc:
                log.debug("load stream from %s broke: %s", worker_id, exc.code().name)
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self.channels.note_failure(endpoint, identity, exc.details() or "")
            finally:
                call.cancel()
            # Jittered, and up to 10 s: a thousand unreachable workers (a crashed rack, records not yet
            # expired) must not cost the router a thousand connection attempts a second.
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(max(backoff * 2, 0.1), 10.0)  # from 0 after a gap: the next failure waits again
