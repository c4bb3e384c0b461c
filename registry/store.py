"""Registry operations: what processes write into etcd, and the intents operators set.

Thin over the client and the session: key paths come from registry.keys,
values from registry.records. Lease-bound writes (nodes, workers, GPU
claims) go through a LeaseSession so they come back after a lost lease;
intents and model specs persist without a lease. Health verdicts are the
control-plane leader's (controlplane.prober): bound to its lease but never
rewritten by a recovered session, so an ex-leader cannot overwrite them.
"""

from __future__ import annotations

from registry.claims import claim_gpus
from registry.etcd_client import EtcdClient
from registry.keys import Keys, Kind, check_name
from registry.records import SCHEMA_VERSION, Entry, encode, from_kv, now_ms
from registry.session import LeaseSession
from tandem.v1 import common_pb2, registry_pb2


class Registry:
    """Registry reads and writes for one prefix. Safe to share between tasks."""

    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    # -- lease-bound records ----------------------------------------------------

    async def register_node(self, session: LeaseSession, record: registry_pb2.NodeRecord) -> bool:
        check_name(record.node, "node")
        return await session.put(self.keys.node(record.node), encode(record))

    async def register_worker(self, session: LeaseSession, record: registry_pb2.WorkerRecord) -> bool:
        """Writes (or rewrites, e.g. on a state change) the worker's record under its lease."""
        check_name(record.worker_id, "worker_id")
        record.lease_id = session.lease_id
        return await session.put(self.keys.worker(record.worker_id), encode(record))

    async def deregister_worker(self, session: LeaseSession, worker_id: str) -> None:
        await session.delete(self.keys.worker(worker_id))

    async def claim_gpus(self, session: LeaseSession, worker_id: str, role: common_pb2.Role.ValueType,
                         node: str, gpu_uuids: list[str]) -> None:
        """See registry.claims.claim_gpus."""
        await claim_gpus(session, self.keys, worker_id, role, node, gpu_uuids)

    # -- persistent intents -----------------------------------------------------

    async def set_drain(self, worker_id: str, requested_by: str, reason: str) -> registry_pb2.DrainIntent:
        intent = registry_pb2.DrainIntent(schema_version=SCHEMA_VERSION, worker_id=check_name(worker_id, "worker_id"),
                                          requested_by=requested_by, requested_at_unix_ms=now_ms(), reason=reason)
        await self.client.put(self.keys.drain(worker_id), encode(intent))
        return intent

    async def clear_drain(self, worker_id: str) -> bool:
        return await self.client.delete(self.keys.drain(check_name(worker_id, "worker_id")))

    async def set_role(self, worker_id: str, role: common_pb2.Role.ValueType, requested_by: str, reason: str, *,
                       plan_generation: int = 0) -> registry_pb2.RoleIntent:
        """Asks `worker_id` to serve `role` live (replaces any role intent it has)."""
        intent = registry_pb2.RoleIntent(schema_version=SCHEMA_VERSION, worker_id=check_name(worker_id, "worker_id"),
                                         role=role, requested_by=requested_by, requested_at_unix_ms=now_ms(),
                                         reason=reason, plan_generation=plan_generation)
        await self.client.put(self.keys.role(worker_id), encode(intent))
        return intent

    async def clear_role(self, worker_id: str) -> bool:
        """Removes the worker's role intent (it keeps the role it has); False when there was none."""
        return await self.client.delete(self.keys.role(check_name(worker_id, "worker_id")))

    async def set_cordon(self, node: str, requested_by: str, reason: str) -> registry_pb2.CordonIntent:
        intent = registry_pb2.CordonIntent(schema_version=SCHEMA_VERSION, node=check_name(node, "node"),
                                           requested_by=requested_by, requested_at_unix_ms=now_ms(), reason=reason)
        await self.client.put(self.keys.cordon(node), encode(intent))
        return intent

    async def clear_cordon(self, node: str) -> bool:
        return await self.client.delete(self.keys.cordon(check_name(node, "node")))

    async def put_model(self, spec: registry_pb2.ModelSpec) -> None:
        await self.client.put(self.keys.model(check_name(spec.name, "model name")), encode(spec))

    async def delete_model(self, name: str) -> bool:
        return await self.client.delete(self.keys.model(check_name(name, "model name")))

    # -- reads ------------------------------------------------------------------

    async def get(self, kind: Kind, name: str) -> Entry | None:
        """The current record of `kind` named `name`, or None (absent or malformed)."""
        key = self.keys.key(kind, name)
        kv = await self.client.get(key)
        if kv is None:
            return None
        return from_kv(kind, name, kv.value, kv.mod_revision, kv.create_revision, kv.lease, key=key)

    async def list(self, kind: Kind) -> tuple[int, list[Entry]]:
        """(revision, entries) of every valid record of `kind`; malformed values are skipped and logged."""
        revision, kvs = await self.client.get_prefix(self.keys.kind_prefix(kind))
        entries = []
        for kv in kvs:
            ref = self.keys.parse(kv.key)
            if ref is None or ref.kind is not kind:
                continue
            entry = from_kv(kind, ref.name, kv.value, kv.mod_revision, kv.create_revision, kv.lease, key=kv.key)
            if entry is not None:
                entries.append(entry)
        return revision, entries
