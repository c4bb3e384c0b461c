"""Writes the router's traffic summary (router_svc.demand_window) to the registry for the planner.

The report lives at `{prefix}/v1/demand/{router_id}` under the router's own
lease, rewritten every `interval_s`: a router that dies takes its report
with it, and the planner never plans for traffic nobody carries any more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

from registry.etcd_client import EtcdClient
from registry.keys import Keys
from registry.records import encode
from registry.session import LeaseSession
from router_svc.demand_window import DemandWindow
from runtime.tasks import cancel_and_wait
from tandem.v1 import registry_pb2


class DemandPublisher:
    """Writes this router's DemandReport under its own lease every `interval_s` (first one at once).

    Never blocks the router: while etcd is away the session keeps the last
    value and the next tick tries again.
    """

    def __init__(self, client: EtcdClient, keys: Keys, router_id: str, window: DemandWindow,
                 slos: Callable[[], Mapping[str, registry_pb2.ServiceLevelObjectives]], *,
                 interval_s: float = 5.0, lease_ttl: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key = keys.demand(router_id)
        self.router_id = router_id
        self.window = window
        self.slos = slos
        self.interval_s = interval_s
        self.clock = clock
        self.session = LeaseSession(client, ttl=lease_ttl, name=f"router {router_id}")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.session.start()
        self._task = asyncio.create_task(self._run(), name="demand-publisher")

    def snapshot(self) -> registry_pb2.DemandReport:
        return registry_pb2.DemandReport(
            router_id=self.router_id, window_end_unix_ms=int(time.time() * 1000), window_s=self.window.window_s,
            models=self.window.report(self.clock(), self.slos()))

    async def _run(self) -> None:
        while True:
            # While etcd is away the session keeps the value and writes it once etcd answers.
            await self.session.put(self.key, encode(self.snapshot()))
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self.session.close()
