"""The Admin API's answers, computed from registry records: pure functions, no I/O.

Every replica answers reads from its RegistryView; the servicer
(controlplane.admin) copies the view's records into a `Snapshot` and calls
these functions. They import neither grpc nor the etcd client, and are
unit-tested with plain records.

Definitions the API promises (admin.proto):
- A GPU's row is its catalog id, or its NVML name when the catalog has no
  match. GPUs no agent reports (a worker on a node without an agent) still
  count, under the worker's `gpu_type`.
- A GPU is held by the worker whose claim names it (or, without a claim, the
  worker listing it); idle otherwise. It is unhealthy when NVML says FAILED or
  its holder's verdict is NOT_SERVING.
- A worker is routable when READY, without a drain intent, on a node without
  a cordon, and not NOT_SERVING (no verdict yet counts as routable): the
  routers' own rule, registry.routable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from registry.keys import KeyRef, Kind
from registry.routable import Health, unroutable_reason
from registry.routable_pb import health_from_pb, worker_state_from_pb
from tandem.v1 import admin_pb2, common_pb2, registry_pb2

UNKNOWN_MODEL = "unknown"


@dataclass(frozen=True)
class Snapshot:
    """Registry records by name, as one replica's view holds them."""

    nodes: Mapping[str, registry_pb2.NodeRecord] = field(default_factory=dict)
    workers: Mapping[str, registry_pb2.WorkerRecord] = field(default_factory=dict)
    # GPU uuid -> claim.
    claims: Mapping[str, registry_pb2.GpuClaim] = field(default_factory=dict)
    # worker id -> verdict.
    health: Mapping[str, registry_pb2.HealthVerdict] = field(default_factory=dict)
    drains: Mapping[str, registry_pb2.DrainIntent] = field(default_factory=dict)
    cordons: Mapping[str, registry_pb2.CordonIntent] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuSlot:
    """One GPU with where it is and who holds it."""

    node: str
    gpu: registry_pb2.GpuInfo
    simulated: bool
    worker_id: str = ""
    role: common_pb2.Role.ValueType = common_pb2.ROLE_UNSPECIFIED

    @property
    def model(self) -> str:
        return self.gpu.catalog_id or self.gpu.name or UNKNOWN_MODEL


def gpu_index(nodes: Mapping[str, registry_pb2.NodeRecord]) -> dict[str, tuple[str, registry_pb2.GpuInfo, bool]]:
    """GPU uuid -> (node, GpuInfo, node simulated) over every agent's inventory."""
    index = {}
    for name, node in nodes.items():
        for gpu in node.gpus:
            index[gpu.uuid] = (name, gpu, node.simulated)
    return index


def gpu_problem(worker: registry_pb2.WorkerRecord, index: Mapping[str, tuple[str, registry_pb2.GpuInfo, bool]]) -> str:
    """Why the worker's GPUs are unusable ("GPU-1 health FAILED: ..."), or "" when none failed."""
    failed = []
    for uuid in worker.gpu_uuids:
        found = index.get(uuid)
        if found is not None and found[1].health == registry_pb2.GPU_HEALTH_FAILED:
            why = found[1].health_reason or "reported by the node agent"
            failed.append(f"{uuid} health FAILED: {why}")
    return "; ".join(failed)


def gpu_slots(snapshot: Snapshot) -> list[GpuSlot]:
    """Every GPU the registry knows of, with its holder; sorted by node, index, uuid."""
    index = gpu_index(snapshot.nodes)
    holders: dict[str, tuple[str, common_pb2.Role.ValueType]] = {}
    # A worker's own list first; its claim (the exclusive truth) overrides.
    for worker in snapshot.workers.values():
        for uuid in worker.gpu_uuids:
            holders.setdefault(uuid, (worker.worker_id, worker.role))
    for uuid, claim in snapshot.claims.items():
        # The claim names the role at claim time; a live role switch changes only the worker's record.
        holder = snapshot.workers.get(claim.worker_id)
        holders[uuid] = (claim.worker_id, holder.role if holder is not None else claim.role)
    slots = []
    for uuid, (node, gpu, simulated) in index.items():
        worker_id, role = holders.get(uuid, ("", common_pb2.ROLE_UNSPECIFIED))
        slots.append(GpuSlot(node, gpu, simulated, worker_id, role))
    for uuid, (worker_id, role) in holders.items():
        if uuid in index:
            continue
        # Held but not in any inventory: a worker on a node without an agent.
        owner = snapshot.workers.get(worker_id)
        held = snapshot.claims.get(uuid)
        node = held.node if held is not None and held.node else owner.node if owner is not None else ""
        gpu_type = owner.gpu_type if owner is not None else ""
        simulated = (owner is not None and owner.simulated) or uuid.startswith("SIM-")
        gpu = registry_pb2.GpuInfo(uuid=uuid, name=gpu_type, catalog_id=gpu_type)
        slots.append(GpuSlot(node, gpu, simulated, worker_id, role))
    slots.sort(key=lambda s: (s.node, s.gpu.index, s.gpu.uuid))
    return slots


def _not_serving(snapshot: Snapshot, worker_id: str) -> bool:
    return health_from_pb(snapshot.health.get(worker_id)) is Health.NOT_SERVING


def routable(snapshot: Snapshot, worker: registry_pb2.WorkerRecord) -> bool:
    """READY, no drain intent, node not cordoned, verdict not NOT_SERVING (registry.routable)."""
    return not unroutable_reason(
        state=worker_state_from_pb(worker.state),
        drain_requested=worker.worker_id in snapshot.drains,
        node_cordoned=worker.node in snapshot.cordons,
        health=health_from_pb(snapshot.health.get(worker.worker_id)),
    )


def worker_statuses(snapshot: Snapshot, *, model: str = "",
                    role: common_pb2.Role.ValueType = common_pb2.ROLE_UNSPECIFIED,
                    node: str = "") -> list[admin_pb2.WorkerStatus]:
    """ListWorkers: every worker matching the filters (empty/unspecified: any), by worker id."""
    rows = []
    for worker_id in sorted(snapshot.workers):
        worker = snapshot.workers[worker_id]
        if (model and worker.model != model) or (role and worker.role != role) or (node and worker.node != node):
            continue
        row = admin_pb2.WorkerStatus(record=worker, node_cordoned=worker.node in snapshot.cordons,
                                     routable=routable(snapshot, worker))
        if worker_id in snapshot.health:
            row.health.CopyFrom(snapshot.health[worker_id])
        if worker_id in snapshot.drains:
            row.drain.CopyFrom(snapshot.drains[worker_id])
        rows.append(row)
    return rows


def gpu_statuses(snapshot: Snapshot, node: str = "") -> list[admin_pb2.GpuStatus]:
    """ListGpus: every GPU (only `node`'s when set)."""
    return [
        admin_pb2.GpuStatus(node=slot.node, gpu=slot.gpu, worker_id=slot.worker_id, role=slot.role,
                            simulated=slot.simulated)
        for slot in gpu_slots(snapshot)
        if not node or slot.node == node
    ]


def node_statuses(snapshot: Snapshot) -> list[admin_pb2.NodeStatus]:
    """ListNodes: every node an agent reports, with its cordon, by name."""
    rows = []
    for name in sorted(snapshot.nodes):
        row = admin_pb2.NodeStatus(record=snapshot.nodes[name], cordoned=name in snapshot.cordons)
        if name in snapshot.cordons:
            row.cordon.CopyFrom(snapshot.cordons[name])
        rows.append(row)
    return rows


def known_nodes(snapshot: Snapshot) -> set[str]:
    """Node names an agent reports or a worker runs on."""
    return set(snapshot.nodes) | {w.node for w in snapshot.workers.values() if w.node}


def fleet_status(snapshot: Snapshot) -> admin_pb2.FleetStatusResponse:
    """FleetStatus without the replica's own fields (leader, answered_by, revision, staleness)."""
    rows: dict[str, admin_pb2.GpuModelSummary] = {}
    for slot in gpu_slots(snapshot):
        row = rows.setdefault(slot.model, admin_pb2.GpuModelSummary(gpu_model=slot.model))
        row.total += 1
        if not slot.worker_id:
            row.idle += 1
        elif slot.role == common_pb2.ROLE_PREFILL:
            row.prefill += 1
        elif slot.role == common_pb2.ROLE_DECODE:
            row.decode += 1
        elif slot.role == common_pb2.ROLE_UNIFIED:
            row.unified += 1
        failed = slot.gpu.health == registry_pb2.GPU_HEALTH_FAILED
        if failed or (slot.worker_id and _not_serving(snapshot, slot.worker_id)):
            row.unhealthy += 1
        if slot.simulated:
            row.simulated += 1
    workers = list(snapshot.workers.values())
    return admin_pb2.FleetStatusResponse(
        gpu_models=[rows[name] for name in sorted(rows)],
        nodes=len(snapshot.nodes),
        cordoned_nodes=len(snapshot.cordons),
        workers=len(workers),
        workers_ready=sum(w.state == registry_pb2.WORKER_STATE_READY for w in workers),
        workers_draining=sum(
            w.state == registry_pb2.WORKER_STATE_DRAINING or w.worker_id in snapshot.drains for w in workers),
        workers_not_serving=sum(_not_serving(snapshot, w.worker_id) for w in workers),
    )


def lease_holder(refs: Iterable[KeyRef], leaders: Mapping[str, registry_pb2.LeaderRecord],
                 claims: Mapping[str, registry_pb2.GpuClaim]) -> str:
    """Who holds a lease, from the registry keys bound to it.

    "control plane cp-1", "worker p-0", "node gpu-3"; "worker X" for a lease
    holding only GPU claims; "" when no key says.
    """
    by_kind: dict[Kind, list[str]] = {}
    for ref in refs:
        by_kind.setdefault(ref.kind, []).append(ref.name)
    for name in by_kind.get(Kind.ELECTION, []):
        record = leaders.get(name)
        return f"control plane {record.replica_id}" if record is not None else "control plane"
    names = sorted(by_kind.get(Kind.WORKER, []))
    if names:
        return "worker " + ", ".join(names)
    names = sorted(by_kind.get(Kind.NODE, []))
    if names:
        return "node " + ", ".join(names)
    holders = sorted({claims[u].worker_id for u in by_kind.get(Kind.GPU_CLAIM, []) if u in claims})
    if holders:
        return "worker " + ", ".join(holders)
    if Kind.HEALTH in by_kind:
        return "control plane"
    return ""
