"""The router's live view: registry (etcd watch) + loads (WatchLoad) -> FleetView snapshots.

Contract: `fleet()` never blocks and never raises for etcd trouble: while
etcd is away it returns the last view (with loads still fresh, since they
come from the workers).

Kept incrementally, so a router with a thousand workers does not rebuild a
thousand candidates per load report: a registry change rebuilds the
candidates it touches (a worker, its verdict or drain intent, every worker
of a cordoned node), a load report marks its worker, and `fleet()` applies
pending load reports at most every `load_refresh_s` and regroups only the
models whose candidates changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from registry.etcd_client import EtcdClient
from registry.keys import Keys, Kind
from registry.view import RegistryView
from router_svc.candidates import Candidate, FleetView
from router_svc.candidates_pb import candidate_from_pb
from router_svc.loads import LoadTracker
from runtime.channels import ChannelPool
from runtime.tasks import cancel_and_wait
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)

_KINDS = (Kind.WORKER, Kind.HEALTH, Kind.DRAIN, Kind.CORDON, Kind.MODEL)


class LiveView:
    def __init__(self, client: EtcdClient, keys: Keys, channels: ChannelPool, *,
                 load_refresh_s: float = 0.02, load_min_interval_ms: int = 50) -> None:
        self.registry = RegistryView(client, keys, kinds=_KINDS)
        self.loads = LoadTracker(channels, min_interval_ms=load_min_interval_ms, on_update=self._load_changed)
        self.load_refresh_s = load_refresh_s
        self._candidates: dict[str, Candidate] = {}
        self._by_model: dict[str, dict[str, Candidate]] = {}
        self._groups: dict[str, tuple[Candidate, ...]] = {}
        self._dirty_models: set[str] = set()
        self._pending_loads: set[str] = set()
        self._fleet = FleetView()
        self._stale = True
        self._loads_applied_at = 0.0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.registry.start()
        self._task = asyncio.create_task(self._follow_registry(), name="router-view")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.loads.close()
        await self.registry.close()

    def fleet(self) -> FleetView:
        """The current snapshot: registry changes at once, load reports at most every load_refresh_s."""
        now = time.monotonic()
        if self._pending_loads and now - self._loads_applied_at >= self.load_refresh_s:
            pending, self._pending_loads = self._pending_loads, set()
            for worker_id in pending:
                self._refresh(worker_id)
            self._loads_applied_at = now
        if self._dirty_models or self._stale:
            for model in self._dirty_models:
                members = self._by_model.get(model)
                if members:
                    self._groups[model] = tuple(sorted(members.values(), key=lambda c: c.worker_id))
                else:
                    self._groups.pop(model, None)
            self._dirty_models.clear()
            self._fleet = FleetView(by_model=dict(self._groups), revision=self.registry.revision)
            self._stale = False
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

    # -- keeping candidates current ---------------------------------------------

    def _refresh(self, worker_id: str) -> None:
        """Rebuilds one worker's candidate from its record, verdict, intents and load."""
        old = self._candidates.pop(worker_id, None)
        if old is not None:
            self._by_model.get(old.model, {}).pop(worker_id, None)
            self._dirty_models.add(old.model)
        entry = self.registry.get(Kind.WORKER, worker_id)
        if entry is None:
            return
        record: registry_pb2.WorkerRecord = entry.record
        health = self.registry.get(Kind.HEALTH, worker_id)
        drain = self.registry.get(Kind.DRAIN, worker_id)
        cordon = self.registry.get(Kind.CORDON, record.node) if record.node else None
        candidate = candidate_from_pb(
            record, load=self.loads.loads.get(worker_id),
            health=health.record if health is not None else None,
            drain=drain.record if drain is not None else None,
            cordon=cordon.record if cordon is not None else None)
        if candidate is None:
            return
        self._candidates[worker_id] = candidate
        self._by_model.setdefault(candidate.model, {})[worker_id] = candidate
        self._dirty_models.add(candidate.model)

    def _load_changed(self, worker_id: str) -> None:
        self._pending_loads.add(worker_id)
        self._changed.set()

    async def _follow_registry(self) -> None:
        changes = self.registry.changes()
        await self.registry.wait_synced(timeout=3600)
        for worker_id in self.registry.entries(Kind.WORKER):
            self._refresh(worker_id)
        self._stale = True
        self._sync_loads()
        self._changed.set()
        async for change in changes:
            if change.kind in (Kind.WORKER, Kind.HEALTH, Kind.DRAIN):
                self._refresh(change.name)
            elif change.kind is Kind.CORDON:
                for worker_id, entry in self.registry.entries(Kind.WORKER).items():
                    if entry.record.node == change.name:
                        self._refresh(worker_id)
            self._stale = True
            self._changed.set()
            if change.kind is Kind.WORKER:
                self._sync_loads()

    def _sync_loads(self) -> None:
        endpoints = {name: e.record.endpoint for name, e in self.registry.entries(Kind.WORKER).items()}
        self.loads.sync(endpoints)
