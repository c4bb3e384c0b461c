"""The router's live view: registry (etcd watch) + loads (WatchLoad) -> FleetView snapshots.

Contract: `fleet()` never blocks and never raises for etcd trouble: while
etcd is away it returns the last view (with loads still fresh, since they
come from the workers).

Kept incrementally, so a router with a thousand workers does not rebuild a
thousand candidates per load report: a registry change rebuilds the
candidates it touches (a worker, its verdict or drain intent, every worker
of a cordoned node), a load report marks its worker, and `fleet()` applies
pending load reports at most every `load_refresh_s`, each in place in its
model's pool (router_svc.candidates.ModelPoolBuilder), and rebuilds a pool
only when a worker joins, leaves or changes routability.

The same load streams carry the workers' prefix-cache events into `kv`
(router_svc.prefix_index), per model; a worker that leaves the registry
leaves the index, and `cached_prefix` answers for one prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client import Gauge

from registry.etcd_client import EtcdClient
from registry.keys import Keys, Kind
from registry.view import RegistryView
from router_svc.candidates import Candidate, FleetView, ModelPool, ModelPoolBuilder
from router_svc.candidates_pb import candidate_from_pb
from router_svc.loads import LoadTracker
from router_svc.prefix_index import CachedPrefix, KvIndex, KvUpdate
from runtime.channels import ChannelPool
from runtime.memory import HeapTrimmer
from runtime.peers import peer_identity
from runtime.tasks import cancel_and_wait
from tandem.v1 import common_pb2, registry_pb2, worker_pb2

log = logging.getLogger(__name__)

_KINDS = (Kind.WORKER, Kind.HEALTH, Kind.DRAIN, Kind.CORDON, Kind.MODEL)
_NO_LOAD_STATES = (registry_pb2.WORKER_STATE_UNSPECIFIED, registry_pb2.WORKER_STATE_STARTING)

VIEW_WORKERS = Gauge("tandem_router_view_workers", "Worker records in the router's view (any state)")
LOAD_STREAMS = Gauge("tandem_router_load_streams", "WatchLoad subscriptions the router holds")
KV_INDEX_ENTRIES = Gauge("tandem_router_kv_index_entries", "(worker, block) entries in the router's prefix index")
KV_SYNCED_WORKERS = Gauge("tandem_router_kv_synced_workers",
                          "Workers whose prefix-cache events the router follows in sequence")
KV_GAPS = Gauge("tandem_router_kv_gaps", "Gaps found in workers' prefix-cache events since start (each resynced)")


class LiveView:
    def __init__(self, client: EtcdClient, keys: Keys, channels: ChannelPool, *,
                 load_refresh_s: float = 0.02, load_min_interval_ms: int = 50, kv_index: KvIndex | None = None
                 ) -> None:
        self.registry = RegistryView(client, keys, kinds=_KINDS)
        self.channels = channels
        # Which workers hold which prompt prefixes, from the events on the load streams.
        self.kv = kv_index if kv_index is not None else KvIndex()
        KV_INDEX_ENTRIES.set_function(lambda: self.kv.entries)
        KV_SYNCED_WORKERS.set_function(self.kv.synced_count)
        KV_GAPS.set_function(lambda: self.kv.gaps_total)
        self.loads = LoadTracker(channels, min_interval_ms=load_min_interval_ms, on_update=self._load_changed,
                                 on_kv=self._kv_events)
        self.load_refresh_s = load_refresh_s
        self._candidates: dict[str, Candidate] = {}
        self._builders: dict[str, ModelPoolBuilder] = {}
        self._pools: dict[str, ModelPool] = {}
        self._dirty_models: set[str] = set()
        self._pending_loads: set[str] = set()
        self._fleet = FleetView()
        self._stale = True
        self._loads_applied_at = 0.0
        self._changed = asyncio.Event()
        self._trimmer = HeapTrimmer()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.registry.start()
        self._task = asyncio.create_task(self._follow_registry(), name="router-view")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self._trimmer.close()
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
                builder = self._builders.get(model)
                if builder:
                    self._pools[model] = builder.build()
                else:
                    self._builders.pop(model, None)
                    self._pools.pop(model, None)
            self._dirty_models.clear()
            self._fleet = FleetView(pools=dict(self._pools), revision=self.registry.revision)
            self._stale = False
        return self._fleet

    def model_spec(self, model: str) -> registry_pb2.ModelSpec | None:
        entry = self.registry.get(Kind.MODEL, model)
        return entry.record if entry is not None else None

    def worker_record(self, worker_id: str) -> registry_pb2.WorkerRecord | None:
        entry = self.registry.get(Kind.WORKER, worker_id)
        return entry.record if entry is not None else None

    def cached_prefix(self, model: str, tokens: tuple[int, ...] | list[int]) -> CachedPrefix:
        """How many of `tokens` each worker of `model` holds in its prefix cache, as its events tell."""
        return self.kv.lookup(model, tokens)

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
        candidate = self._candidate_of(worker_id)
        if old is not None and (candidate is None or candidate.model != old.model):
            self._builders[old.model].remove(worker_id)
            self._dirty_models.add(old.model)
        if candidate is None:
            if self.registry.get(Kind.WORKER, worker_id) is None:
                self.kv.drop(worker_id)
            return
        self._candidates[worker_id] = candidate
        self._builders.setdefault(candidate.model, ModelPoolBuilder()).put(candidate)
        self._dirty_models.add(candidate.model)

    def _candidate_of(self, worker_id: str) -> Candidate | None:
        entry = self.registry.get(Kind.WORKER, worker_id)
        if entry is None:
            return None
        record: registry_pb2.WorkerRecord = entry.record
        health = self.registry.get(Kind.HEALTH, worker_id)
        drain = self.registry.get(Kind.DRAIN, worker_id)
        cordon = self.registry.get(Kind.CORDON, record.node) if record.node else None
        return candidate_from_pb(
            record, load=self.loads.loads.get(worker_id),
            health=health.record if health is not None else None,
            drain=drain.record if drain is not None else None,
            cordon=cordon.record if cordon is not None else None)

    def _kv_events(self, worker_id: str, events: worker_pb2.KvEvents | None, fresh: bool) -> bool:
        """One load report's prefix-cache events into the index; False on a gap (resubscribe)."""
        entry = self.registry.get(Kind.WORKER, worker_id)
        if entry is None:
            return True
        record: registry_pb2.WorkerRecord = entry.record
        update = None if events is None else KvUpdate(
            block_size=events.block_size, since_seq=events.since_seq, last_seq=events.last_seq,
            stored=events.stored, removed=events.removed, snapshot=events.snapshot)
        if update is not None and update.block_size < 1:
            return True
        return self.kv.apply(worker_id, record.model, record.role == common_pb2.ROLE_PREFILL, update, fresh=fresh)

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
            known = len(self._candidates)
            if change.kind in (Kind.WORKER, Kind.HEALTH, Kind.DRAIN):
                self._refresh(change.name)
            elif change.kind is Kind.CORDON:
                for worker_id, entry in self.registry.entries(Kind.WORKER).items():
                    if entry.record.node == change.name:
                        self._refresh(worker_id)
            self._stale = True
            self._changed.set()
            if change.kind is Kind.WORKER:
                self._sync_load(change.name)
            if len(self._candidates) < known:
                # After a mass deletion (a registry flood revoked) the freed memory goes back to the OS.
                self._trimmer.removed(known - len(self._candidates))
            VIEW_WORKERS.set(len(self._candidates))
            LOAD_STREAMS.set(len(self.loads))

    def _sync_loads(self) -> None:
        for worker_id in self.registry.entries(Kind.WORKER):
            self._sync_load(worker_id)
        VIEW_WORKERS.set(len(self._candidates))
        LOAD_STREAMS.set(len(self.loads))

    def _sync_load(self, worker_id: str) -> None:
        """Follows the worker's load while it may take work (a STARTING one may not: a fleet registering
        at once, or records forged in bulk, costs no streams until they are READY); drops the channel of
        an endpoint no worker uses any more."""
        entry = self.registry.get(Kind.WORKER, worker_id)
        record: registry_pb2.WorkerRecord | None = entry.record if entry is not None else None
        if record is None or record.state in _NO_LOAD_STATES:
            endpoint = self.loads.endpoint_of(worker_id)
            self.loads.unfollow(worker_id)
            if endpoint and not self.loads.followed_at(endpoint):
                self.channels.drop(endpoint)
            return
        # What the worker's certificate must name (checked when the channel pool verifies identities).
        identity = peer_identity(worker_id, record.node)
        self.loads.follow(worker_id, record.endpoint, identity)
