"""A worker's presence in the registry: its record, GPU claims, and drain intent.

Contract:
- `start()` registers the record (state STARTING) under the worker's own
  lease; it does not wait for etcd, so a worker comes up while etcd is away
  and registers as soon as etcd answers (the session rewrites bound keys).
- `claim_gpus()` claims every GPU or none; GpuAlreadyClaimed names holders.
- `set_state()` rewrites the record in place (same key, same lease).
- Drain intents for this worker are watched; `on_drain(True/False)` is
  called when one appears or is removed (operators' `tandemctl drain`).
- `deregister()` revokes the lease: the record and claims vanish at once.
  `register_again()` undoes it. `close()` is safe to call twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from registry.etcd_client import EtcdClient
from registry.keys import Kind
from registry.session import LeaseSession
from registry.store import Registry
from registry.view import RegistryView
from runtime.tasks import cancel_and_wait
from tandem.v1 import registry_pb2
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkerRegistration:
    def __init__(self, settings: WorkerSettings, record: registry_pb2.WorkerRecord,
                 on_drain: Callable[[bool], Awaitable[None]]) -> None:
        self.settings = settings
        self.record = record
        self.keys = settings.keys()
        self.client = EtcdClient(settings.etcd_settings())
        self.registry = Registry(self.client, self.keys)
        self.session: LeaseSession | None = None
        self._on_drain = on_drain
        self._claimed: list[str] = []
        self._view = RegistryView(self.client, self.keys, prefix=self.keys.kind_prefix(Kind.DRAIN),
                                  kinds=[Kind.DRAIN])
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    async def start(self) -> None:
        await self.client.connect()
        await self._open_session()
        self._view.start()
        self._watch_task = asyncio.create_task(self._watch_drain(), name="drain-watch")

    async def _open_session(self) -> None:
        self.session = LeaseSession(self.client, ttl=self.settings.lease_ttl, name=self.worker_id)
        self.session.start()
        await self.registry.register_worker(self.session, self.record)

    async def claim_gpus(self, gpu_uuids: list[str]) -> None:
        """Claims the GPUs (waiting up to the lease TTL for etcd to grant a lease first)."""
        assert self.session is not None
        if not gpu_uuids:
            return
        await self.session.wait_alive(self.settings.lease_ttl)
        await self.registry.claim_gpus(self.session, self.worker_id, self.record.role, self.record.node, gpu_uuids)
        self._claimed = list(gpu_uuids)

    async def set_state(self, state: registry_pb2.WorkerState.ValueType) -> None:
        self.record.state = state
        if self.session is not None:
            await self.registry.register_worker(self.session, self.record)

    async def deregister(self) -> None:
        """Leaves the registry (record and claims) by revoking the lease."""
        if self.session is not None:
            await self.session.close()
            self.session = None
            log.info("deregistered", extra={"worker_id": self.worker_id})

    async def register_again(self) -> None:
        if self.session is None and not self._closed:
            await self._open_session()
            if self._claimed:
                await self.claim_gpus(self._claimed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._watch_task)
        await self._view.close()
        await self.deregister()
        await self.client.close()

    async def _watch_drain(self) -> None:
        draining = False
        changes = self._view.changes()
        await self._view.wait_synced(timeout=3600)
        while True:
            wanted = self._view.get(Kind.DRAIN, self.worker_id) is not None
            if wanted != draining:
                draining = wanted
                log.info("drain intent %s", "set" if wanted else "removed", extra={"worker_id": self.worker_id})
                try:
                    await self._on_drain(wanted)
                except Exception:
                    log.exception("drain handler failed")
            await anext(changes)
