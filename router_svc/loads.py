"""WatchLoad subscriptions: the router's live load figures for every worker in view.

One background task per worker streams its LoadReports (reconnecting with
backoff) and keeps the latest as a policy `Load`, stamped with the router's
own monotonic clock. A worker that leaves the registry loses its task; a
stream that breaks keeps the last figures, which age, and the policy's
stale-load penalty does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import grpc

from router_svc.candidates import Load
from router_svc.candidates_pb import load_from_pb
from runtime.channels import ChannelPool
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class LoadTracker:
    """Latest Load per worker id. `sync()` from the event loop; `close()` safe twice."""

    def __init__(self, channels: ChannelPool, *, min_interval_ms: int = 50, max_interval_ms: int = 1000,
                 on_update: Callable[[str], None] = lambda worker_id: None) -> None:
        self.channels = channels
        self.min_interval_ms = min_interval_ms
        self.max_interval_ms = max_interval_ms
        self.loads: dict[str, Load] = {}
        self._on_update = on_update
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}

    def sync(self, endpoints: Mapping[str, str]) -> None:
        """Subscribes to every worker in `endpoints` (id -> endpoint) and drops the others."""
        for worker_id, (endpoint, task) in list(self._tasks.items()):
            if endpoints.get(worker_id) != endpoint:
                task.cancel()
                del self._tasks[worker_id]
                self.loads.pop(worker_id, None)
        for worker_id, endpoint in endpoints.items():
            if worker_id not in self._tasks:
                task = asyncio.create_task(self._follow(worker_id, endpoint), name=f"watch-load-{worker_id}")
                self._tasks[worker_id] = (endpoint, task)

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

    async def _follow(self, worker_id: str, endpoint: str) -> None:
        backoff = 0.1
        request = worker_pb2.WatchLoadRequest(min_interval_ms=self.min_interval_ms,
                                              max_interval_ms=self.max_interval_ms)
        while True:
            stub = worker_pb2_grpc.WorkerStub(self.channels.get(endpoint))
            call = stub.WatchLoad(request)
            try:
                async for report in call:
                    self.loads[worker_id] = load_from_pb(report, time.monotonic())
                    self._on_update(worker_id)
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                log.debug("load stream from %s broke: %s", worker_id, exc.code().name)
            finally:
                call.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
