"""A worker's presence in the registry: its record, GPU claims, and drain and role intents.

Contract:
- `start()` registers the record (state STARTING) under the worker's own
  lease; it does not wait for etcd, so a worker comes up while etcd is away
  and registers as soon as etcd answers (the session rewrites bound keys).
- `claim_gpus()` claims every GPU or none; GpuAlreadyClaimed names holders.
  It waits for etcd as long as it takes (capped backoff, a log line per
  attempt with the reason and the next delay); cancel it to give up.
  Once claimed, when the node agent's inventory lists the GPUs, the record's
  gpu_type and gpu_count are theirs (`gpus_from_inventory`), whatever the
  flags said; the next `set_state()` publishes them.
- `set_state()` rewrites the record in place (same key, same lease);
  `set_role()` also changes its role (a live role switch).
- Drain intents for this worker are watched; `on_drain(True/False)` is
  called when one appears or is removed (operators' `tandemctl drain`).
  So are role intents: `on_role(intent or None)` on every change of this
  worker's RoleIntent; it must not block (a switch runs in its own task).
  `role_intent()` reads the current one once the watch has loaded.
- `deregister()` revokes the lease: the record and claims vanish at once.
  `register_again()` undoes it. `close()` is safe to call twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from engine.base import ModelShape
from registry.claims import GpuAlreadyClaimed
from registry.etcd_client import EtcdClient, EtcdUnavailable
from registry.keys import Kind
from registry.session import LeaseSession
from registry.store import Registry
from registry.view import RegistryView
from runtime.tasks import cancel_and_wait
from tandem.v1 import common_pb2, registry_pb2
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def model_shape_to_pb(shape: ModelShape | None) -> registry_pb2.ModelShape:
    """What WorkerRecord.model_shape carries for the engine's shape (empty when the engine knows none)."""
    if shape is None:
        return registry_pb2.ModelShape()
    return registry_pb2.ModelShape(
        total_params=shape.total_params, active_params=shape.active_params, weight_bytes=shape.weight_bytes,
        kv_bytes_per_token=shape.kv_bytes_per_token, num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)


def gpus_from_inventory(node: registry_pb2.NodeRecord | None, gpu_uuids: Sequence[str],
                        gpu_type: str, gpu_count: int) -> tuple[str, int, str]:
    """(gpu_type, gpu_count, why the flags were overridden or kept; "" when they agree). Pure.

    The claimed GPUs' catalog ids in the node agent's inventory are the
    truth; the flags stand only where the inventory cannot answer (no agent,
    a GPU it does not list or could not match to the catalog).
    """
    if node is None or not gpu_uuids:
        return gpu_type, gpu_count, ""
    listed = {gpu.uuid: gpu for gpu in node.gpus}
    missing = [uuid for uuid in gpu_uuids if uuid not in listed]
    if missing:
        return gpu_type, gpu_count, (f"GPUs {', '.join(missing)} are not in node {node.node!r}'s inventory; "
                                     f"keeping --gpu-type {gpu_type!r} --gpu-count {gpu_count}")
    types = sorted({listed[uuid].catalog_id for uuid in gpu_uuids})
    if len(types) != 1 or not types[0]:
        names = ", ".join(sorted({listed[uuid].name for uuid in gpu_uuids}))
        return gpu_type, gpu_count, (f"the claimed GPUs ({names}) are not of one catalog type; "
                                     f"keeping --gpu-type {gpu_type!r} --gpu-count {gpu_count}")
    found, count = types[0], len(gpu_uuids)
    if (gpu_type and gpu_type != found) or gpu_count not in (1, count):
        return found, count, (f"node {node.node!r}'s inventory has the claimed GPUs as {count}x {found}; "
                              f"that, not --gpu-type {gpu_type!r} --gpu-count {gpu_count}, is published")
    return found, count, ""


# Waits between GPU claim attempts while etcd does not answer: doubling, capped.
CLAIM_RETRY_FIRST_S = 0.5
CLAIM_RETRY_MAX_S = 5.0


class WorkerRegistration:
    def __init__(self, settings: WorkerSettings, record: registry_pb2.WorkerRecord,
                 on_drain: Callable[[bool], Awaitable[None]],
                 on_role: Callable[[registry_pb2.RoleIntent | None], None] = lambda intent: None) -> None:
        self.settings = settings
        self.record = record
        self.keys = settings.keys()
        self.client = EtcdClient(settings.etcd_settings())
        self.registry = Registry(self.client, self.keys)
        self.session: LeaseSession | None = None
        self._on_drain = on_drain
        self._on_role = on_role
        self._claimed: list[str] = []
        # Both intents live under admin/ (cordons there are filtered out by kind).
        self._view = RegistryView(self.client, self.keys, prefix=f"{self.keys.root}admin/",
                                  kinds=[Kind.DRAIN, Kind.ROLE])
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    async def start(self) -> None:
        await self.client.connect()
        await self._open_session()
        self._view.start()
        self._watch_task = asyncio.create_task(self._watch_intents(), name="intent-watch")

    async def _open_session(self) -> None:
        self.session = LeaseSession(self.client, ttl=self.settings.lease_ttl, name=self.worker_id)
        self.session.start()
        await self.registry.register_worker(self.session, self.record)

    async def claim_gpus(self, gpu_uuids: list[str]) -> None:
        """Claims the GPUs, all or none, however long etcd takes to answer; cancel it to give up.

        Raises GpuAlreadyClaimed naming the holders. A claim still held under
        this worker's own id (its previous process, killed before it could
        revoke its lease) is waited out for a few lease TTLs first.
        """
        session = self.session
        assert session is not None
        if not gpu_uuids:
            return
        ttl = self.settings.lease_ttl
        attempt, stale_since = 0, 0.0
        while True:
            attempt += 1
            try:
                await self.registry.claim_gpus(session, self.worker_id, self.record.role, self.record.node,
                                               gpu_uuids)
                break
            except EtcdUnavailable as exc:
                reason = str(exc)
            except GpuAlreadyClaimed as exc:
                stale_since = stale_since or time.monotonic()
                if set(exc.holders.values()) != {self.worker_id} or time.monotonic() - stale_since > 3 * ttl:
                    raise
                reason = f"{exc} (a previous process of this worker: its lease expires within {ttl} s)"
            delay = min(CLAIM_RETRY_FIRST_S * 2 ** (attempt - 1), CLAIM_RETRY_MAX_S)
            log.warning("GPU claim attempt %d failed: %s; retrying in %.1f s", attempt, reason, delay,
                        extra={"worker_id": self.worker_id, "gpus": ",".join(gpu_uuids)})
            if session.alive:
                await asyncio.sleep(delay)
            else:
                await session.wait_alive(delay)  # etcd's first answer cuts the wait short
        if attempt > 1:
            log.info("GPUs claimed after %d attempts", attempt, extra={"gpus": ",".join(gpu_uuids)})
        self._claimed = list(gpu_uuids)
        await self._gpus_from_inventory(gpu_uuids)

    async def _gpus_from_inventory(self, gpu_uuids: list[str]) -> None:
        """Takes gpu_type and gpu_count from the agent's record of this node, when there is one."""
        try:
            entry = await self.registry.get(Kind.NODE, self.record.node) if self.record.node else None
        except EtcdUnavailable as exc:  # the flags stand, as without an agent
            log.warning("cannot read node %r's inventory (%s); GPU type from --gpu-type", self.record.node, exc)
            return
        gpu_type, gpu_count, why = gpus_from_inventory(entry.record if entry is not None else None, gpu_uuids,
                                                       self.settings.gpu_type, self.settings.gpu_count)
        if why:
            log.warning("%s", why, extra={"worker_id": self.worker_id})
        self.record.gpu_type, self.record.gpu_count = gpu_type, gpu_count

    async def set_state(self, state: registry_pb2.WorkerState.ValueType) -> None:
        self.record.state = state
        if self.session is not None:
            await self.registry.register_worker(self.session, self.record)

    async def set_role(self, role: common_pb2.Role.ValueType, state: registry_pb2.WorkerState.ValueType) -> None:
        """Rewrites the record with `role` and `state`."""
        self.record.role = role
        await self.set_state(state)

    async def role_intent(self, timeout: float) -> registry_pb2.RoleIntent | None:
        """This worker's role intent, once the intent watch has loaded (None: none, or not loaded in `timeout`)."""
        if not await self._view.wait_synced(timeout):
            log.warning("role intents not loaded within %.0f s; starting in the configured role", timeout,
                        extra={"worker_id": self.worker_id})
            return None
        entry = self._view.get(Kind.ROLE, self.worker_id)
        return entry.record if entry is not None else None

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

    async def _watch_intents(self) -> None:
        draining = False
        role_revision = 0
        changes = self._view.changes()
        await self._view.wait_synced(timeout=3600)
        while True:
            role_entry = self._view.get(Kind.ROLE, self.worker_id)
            revision = role_entry.mod_revision if role_entry is not None else 0
            if revision != role_revision:
                role_revision = revision
                try:
                    self._on_role(role_entry.record if role_entry is not None else None)
                except Exception:
                    log.exception("role intent handler failed")
            wanted = self._view.get(Kind.DRAIN, self.worker_id) is not None
            if wanted != draining:
                draining = wanted
                log.info("drain intent %s", "set" if wanted else "removed", extra={"worker_id": self.worker_id})
                try:
                    await self._on_drain(wanted)
                except Exception:
                    log.exception("drain handler failed")
            await anext(changes)
