"""The router's live view: registry (etcd watch) + loads (WatchLoad) -> FleetView snapshots.

Contract: `fleet()` never blocks and never raises for etcd trouble: while
etcd is away it returns the last view (with loads still fresh, since they
come from the workers). Snapshots are rebuilt when the registry changes, and
at most every `load_refresh_s` for load-only changes, so a busy router does
not rebuild a thousand candidates per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from controlplane.etcd_client import EtcdClient
from controlplane.keys import Keys, Kind
from controlplane.runtime.channels import ChannelPool
from controlplane.view import RegistryView
from router_svc.candidates import FleetView
from router_svc.candidates_pb import fleet_view_from_pb
from router_svc.loads import LoadTracker
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)

_KINDS = (Kind.WORKER, Kind.HEALTH, Kind.DRAIN, Kind.CORDON, Kind.MODEL)


class LiveView:
    def __init__(self, client: EtcdClient, keys: Keys, channels: ChannelPool, *,
                 load_refresh_s: float = 0.02, load_min_interval_ms: int = 50) -> None:
        self.registry = RegistryView(client, keys, kinds=_KINDS)
        self.loads = LoadTracker(channels, min_interval_ms=load_min_interval_ms, on_update=self._loads_changed)
        self.load_refresh_s = load_refresh_s
        self._fleet = FleetView()
        self._registry_dirty = True
        self._loads_dirty = False
        self._built_at = 0.0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.registry.start()
        self._task = asyncio.create_task(self._follow_registry(), name="router-view")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.loads.close()
        await self.registry.close()

    def fleet(self) -> FleetView:
        """The current snapshot (rebuilt if the registry changed or loads are due)."""
        now = time.monotonic()
        if self._registry_dirty or (self._loads_dirty and now - self._built_at >= self.load_refresh_s):
            self._rebuild(now)
        return self._fleet

    def model_spec(self, model: str) -> registry_pb2.ModelSpec | None:
        entry = self.registry.get(Kind.MODEL, model)
        return entry.record if entry is not None else None

    def worker_record(self, worker_id: str) -> registry_pb2.WorkerRecord | None:
        entry = self.registry.get(Kind.WORKER, worker_id)
        return entry.record if entry is not None else None

    def staleness(self) -> float:
        return self.registry.staleness()

    async def wait_changed(self, timeout: float) -> None:
        """Returns when the registry or a load changes, or after `timeout`."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    def _rebuild(self, now: float) -> None:
        workers = [e.record for e in self.registry.entries(Kind.WORKER).values()]
        self._fleet = fleet_view_from_pb(
            workers,
            loads=self.loads.loads,
            health={name: e.record for name, e in self.registry.entries(Kind.HEALTH).items()},
            drains=set(self.registry.entries(Kind.DRAIN)),
            cordons=set(self.registry.entries(Kind.CORDON)),
            revision=self.registry.revision,
        )
        self._registry_dirty = self._loads_dirty = False
        self._built_at = now

    def _loads_changed(self) -> None:
        self._loads_dirty = True
        self._changed.set()

    async def _follow_registry(self) -> None:
        changes = self.registry.changes()
        self._sync_loads()
        async for change in changes:
            self._registry_dirty = True
            self._changed.set()
            if change.kind is Kind.WORKER:
                self._sync_loads()

    def _sync_loads(self) -> None:
        endpoints = {name: e.record.endpoint for name, e in self.registry.entries(Kind.WORKER).items()}
        self.loads.sync(endpoints)
