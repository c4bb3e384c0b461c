"""tandem.v1 messages -> policy snapshots (`Candidate`, `Load`, `FleetView`).

The thin adapter between the router's registry view / WatchLoad
subscriptions and the pure policy. Imports the generated messages only: no
channels, no etcd. Every function is pure and may run concurrently.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

from registry.routable_pb import health_from_pb, worker_state_from_pb
from router_svc.candidates import Candidate, FleetView, Load, ModelShape, Role, make_candidate
from tandem.v1 import common_pb2, registry_pb2, worker_pb2

_ROLES = {
    common_pb2.ROLE_PREFILL: Role.PREFILL,
    common_pb2.ROLE_DECODE: Role.DECODE,
    common_pb2.ROLE_UNIFIED: Role.UNIFIED,
}


def load_from_pb(report: worker_pb2.LoadReport, received_at: float) -> Load:
    """A `Load` from a LoadReport that arrived at `received_at` (router's monotonic clock)."""
    return Load(
        queued_prefill_tokens=report.queued_prefill_tokens,
        active_requests=report.active_requests,
        active_sequences=report.active_sequences,
        kv_blocks_used=report.kv_blocks_used,
        kv_blocks_total=report.kv_blocks_total,
        kv_block_size=report.kv_block_size_tokens,
        max_batch_size=report.max_batch_size,
        draining=report.draining,
        prefix_cache_hit_rate=min(1.0, max(0.0, report.prefix_cache_hit_rate)),
        received_at=received_at,
    )


def shape_from_pb(shape: registry_pb2.ModelShape) -> ModelShape | None:
    """The cost model's view of a published shape; None when unset or unusable (no parameter count).

    Per active parameter, the weights cost their average bytes: a
    mixture-of-experts' quantized experts lower it, as they lower the bytes
    a decode step reads.
    """
    if not math.isfinite(shape.active_params) or shape.active_params <= 0:
        return None
    usable = math.isfinite(shape.weight_bytes / shape.total_params) if shape.total_params > 0 else False
    per_param = shape.weight_bytes / shape.total_params if usable and shape.weight_bytes > 0 else 2.0
    return ModelShape(params=shape.active_params, kv_bytes_per_token=float(shape.kv_bytes_per_token),
                      bytes_per_param=per_param, num_layers=shape.num_layers)


def candidate_from_pb(
    record: registry_pb2.WorkerRecord,
    *,
    load: Load | None = None,
    health: registry_pb2.HealthVerdict | None = None,
    drain: registry_pb2.DrainIntent | None = None,
    cordon: registry_pb2.CordonIntent | None = None,
) -> Candidate | None:
    """The policy's view of one worker, or None for a record with no usable role.

    `drain` / `cordon` are the intents for this worker / its node, if any;
    `health` the prober's latest verdict, if any. A record with an
    unspecified role is skipped rather than guessed at.
    """
    role = _ROLES.get(record.role)
    if role is None:
        return None
    capacity = record.capacity
    return make_candidate(
        worker_id=record.worker_id,
        role=role,
        model=record.model,
        endpoint=record.endpoint,
        state=worker_state_from_pb(record.state),
        drain_requested=drain is not None,
        node_cordoned=cordon is not None,
        health=health_from_pb(health),
        load=load,
        node=record.node,
        host=record.host,
        gpu_type=record.gpu_type,
        gpu_count=max(1, record.gpu_count),
        kv_blocks_total=capacity.kv_blocks_total,
        kv_block_size=capacity.kv_block_size_tokens,
        max_batch_size=capacity.max_batch_size,
        max_context_tokens=capacity.max_context_tokens,
        kv_transports=tuple(record.kv_transports),
        shape=shape_from_pb(record.model_shape) if record.HasField("model_shape") else None,
    )


def fleet_view_from_pb(
    records: Iterable[registry_pb2.WorkerRecord],
    *,
    loads: Mapping[str, Load] | None = None,
    health: Mapping[str, registry_pb2.HealthVerdict] | None = None,
    drains: Collection[str] = (),
    cordons: Collection[str] = (),
    revision: int = 0,
) -> FleetView:
    """A `FleetView` from the registry's records and the routers' latest loads.

    `loads` and `health` are keyed by worker_id; `drains` holds the worker
    ids with a drain intent, `cordons` the cordoned node names (pass sets:
    membership is tested once per worker).
    """
    loads = loads or {}
    health = health or {}
    candidates = []
    for record in records:
        candidate = candidate_from_pb(
            record,
            load=loads.get(record.worker_id),
            health=health.get(record.worker_id),
            drain=registry_pb2.DrainIntent(worker_id=record.worker_id) if record.worker_id in drains else None,
            cordon=registry_pb2.CordonIntent(node=record.node) if record.node in cordons else None,
        )
        if candidate is not None:
            candidates.append(candidate)
    return FleetView.of(candidates, revision=revision)
