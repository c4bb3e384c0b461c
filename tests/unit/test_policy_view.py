"""tandem.v1 registry and load messages -> the policy's FleetView."""

from __future__ import annotations

from router_svc.candidates import (
    Candidate,
    FleetView,
    Health,
    Load,
    ModelPool,
    ModelPoolBuilder,
    Role,
    WorkerState,
    make_candidate,
    unroutable_reason,
)
from router_svc.candidates_pb import candidate_from_pb, fleet_view_from_pb, load_from_pb
from router_svc.policies import choose
from router_svc.policy import RouteRequest
from tandem.v1 import common_pb2, registry_pb2, worker_pb2


def record(worker_id: str, role: int = common_pb2.ROLE_DECODE, **kw: object) -> registry_pb2.WorkerRecord:
    values: dict[str, object] = {
        "schema_version": 1,
        "worker_id": worker_id,
        "role": role,
        "model": "m",
        "endpoint": f"10.0.0.1:{len(worker_id)}",
        "node": f"node-{worker_id}",
        "host": "10.0.0.1",
        "gpu_type": "H100-SXM",
        "gpu_count": 2,
        "state": registry_pb2.WORKER_STATE_READY,
        "capacity": registry_pb2.WorkerCapacity(
            kv_blocks_total=1000, kv_block_size_tokens=16, max_batch_size=32, max_context_tokens=8192
        ),
        "kv_transports": ["grpc", "shm"],
    }
    values.update(kw)
    return registry_pb2.WorkerRecord(**values)  # type: ignore[arg-type]


def test_record_and_load_become_a_candidate() -> None:
    report = worker_pb2.LoadReport(
        worker_id="d1", queued_prefill_tokens=300, active_requests=4, active_sequences=3, kv_blocks_used=100,
        kv_blocks_total=900, kv_block_size_tokens=16, max_batch_size=24, prefix_cache_hit_rate=1.7,
    )
    c = candidate_from_pb(record("d1"), load=load_from_pb(report, received_at=50.0))
    assert c is not None and c.routable
    assert (c.role, c.model, c.gpu_type, c.gpu_count, c.host) == (Role.DECODE, "m", "H100-SXM", 2, "10.0.0.1")
    assert c.kv_transports == ("grpc", "shm") and c.max_context_tokens == 8192
    # The load report's capacity wins over the record's.
    assert (c.blocks_total, c.free_blocks, c.batch_limit) == (900, 800, 24)
    assert c.load is not None and c.load.prefix_cache_hit_rate == 1.0
    assert c.load_age(52.5) == 2.5


def test_record_without_load_uses_its_capacity() -> None:
    c = candidate_from_pb(record("d1"))
    assert c is not None and c.load is None and c.load_age(1.0) is None
    assert (c.blocks_total, c.free_blocks, c.batch_limit, c.block_size) == (1000, 1000, 32, 16)


def test_unspecified_role_is_skipped() -> None:
    assert candidate_from_pb(record("x", role=common_pb2.ROLE_UNSPECIFIED)) is None


def test_routability_follows_state_intents_health_and_load() -> None:
    records = [
        record("ok"),
        record("starting", state=registry_pb2.WORKER_STATE_STARTING),
        record("draining", state=registry_pb2.WORKER_STATE_DRAINING),
        record("unset", state=registry_pb2.WORKER_STATE_UNSPECIFIED),
        record("drained"),
        record("cordoned", node="bad-node"),
        record("sick"),
        record("healthy"),
        record("load-draining"),
    ]
    verdicts = {
        "sick": registry_pb2.HealthVerdict(worker_id="sick", status=registry_pb2.SERVING_STATUS_NOT_SERVING),
        "healthy": registry_pb2.HealthVerdict(worker_id="healthy", status=registry_pb2.SERVING_STATUS_SERVING),
    }
    loads = {"load-draining": load_from_pb(worker_pb2.LoadReport(draining=True), received_at=0.0)}
    fleet = fleet_view_from_pb(
        records, loads=loads, health=verdicts, drains={"drained"}, cordons={"bad-node"}, revision=42
    )
    reasons = {c.worker_id: c.unroutable for c in fleet}
    assert reasons == {
        "ok": "",
        "starting": "state-starting",
        "draining": "draining",
        "unset": "state-unknown",
        "drained": "drain-requested",
        "cordoned": "cordoned",
        "sick": "not-serving",
        "healthy": "",
        "load-draining": "draining",
    }
    assert fleet.revision == 42 and fleet.models() == ["m"]
    assert fleet.routable_counts("m") == (0, 2)


def test_view_is_grouped_by_model_sorted_and_routable() -> None:
    fleet = fleet_view_from_pb([
        record("d2"), record("d1"), record("p1", role=common_pb2.ROLE_PREFILL), record("x", model="other"),
    ])
    assert [c.worker_id for c in fleet.candidates("m")] == ["d1", "d2", "p1"]
    assert fleet.get("x") is not None and fleet.get("nope") is None
    decision = choose(RouteRequest(model="m", prompt_tokens=1000, max_tokens=10), fleet, now=0.0)
    assert decision.prefill is not None and decision.prefill.worker_id == "p1"


def test_unroutable_reason_needs_a_model() -> None:
    assert unroutable_reason(
        state=WorkerState.READY, drain_requested=False, load_draining=False, node_cordoned=False,
        health=Health.SERVING, model="",
    ) == "no-model"


def test_the_admin_api_and_the_routers_agree_on_routability() -> None:
    # One rule (registry.routable): `tandemctl get workers` says routable exactly when a router routes there.
    from controlplane.fleet import Snapshot, routable

    states = [registry_pb2.WORKER_STATE_UNSPECIFIED, registry_pb2.WORKER_STATE_STARTING,
              registry_pb2.WORKER_STATE_READY, registry_pb2.WORKER_STATE_DRAINING]
    statuses = [None, registry_pb2.SERVING_STATUS_UNSPECIFIED, registry_pb2.SERVING_STATUS_SERVING,
                registry_pb2.SERVING_STATUS_NOT_SERVING]
    for state in states:
        for status in statuses:
            for drained in (False, True):
                for cordoned in (False, True):
                    rec = record("w", state=state)
                    verdict = None if status is None else registry_pb2.HealthVerdict(worker_id="w", status=status)
                    snapshot = Snapshot(
                        workers={"w": rec}, health={"w": verdict} if verdict is not None else {},
                        drains={"w": registry_pb2.DrainIntent(worker_id="w")} if drained else {},
                        cordons={rec.node: registry_pb2.CordonIntent(node=rec.node)} if cordoned else {})
                    candidate = fleet_view_from_pb([rec], health=dict(snapshot.health), drains=set(snapshot.drains),
                                                   cordons=set(snapshot.cordons)).get("w")
                    assert candidate is not None
                    assert candidate.routable == routable(snapshot, rec), (state, status, drained, cordoned)


def _candidate(worker_id: str, *, role: Role = Role.DECODE, used: int = 0, state: WorkerState = WorkerState.READY,
               ) -> Candidate:
    return make_candidate(worker_id=worker_id, role=role, model="m", endpoint=f"{worker_id}:1", state=state,
                          load=Load(kv_blocks_used=used, kv_blocks_total=100, kv_block_size=16),
                          kv_blocks_total=100, kv_block_size=16)


def test_pool_builder_replays_load_changes_in_place_and_rebuilds_on_membership_changes() -> None:
    builder = ModelPoolBuilder()
    for worker_id in ("d3", "d1", "p1", "d2"):
        builder.put(_candidate(worker_id, role=Role.PREFILL if worker_id.startswith("p") else Role.DECODE))
    first = builder.build()
    assert [c.worker_id for c in first.decoders] == ["d1", "d2", "d3"]
    assert [c.worker_id for c in first.prefillers] == ["p1"]
    assert builder.build() is first  # nothing changed

    builder.put(_candidate("d2", used=40))  # a load report: same place, new figures
    second = builder.build()
    assert [c.worker_id for c in second.decoders] == ["d1", "d2", "d3"]
    assert second.by_id["d2"].free_blocks == 60 and second.decoders[1].free_blocks == 60
    assert first.by_id["d2"].free_blocks == 100  # the earlier snapshot is untouched

    builder.put(_candidate("d1", state=WorkerState.DRAINING))  # routability changed: rebuilt
    builder.remove("d3")
    builder.put(_candidate("d0"))
    third = builder.build()
    assert [c.worker_id for c in third.candidates] == ["d0", "d1", "d2", "p1"]
    assert [c.worker_id for c in third.decoders] == ["d0", "d2"]
    assert third.decoders_seen == 3 and third.prefillers_seen == 1
    assert ModelPool.of(third.candidates) == third


def test_pool_of_a_view_built_either_way_is_the_same() -> None:
    candidates = [_candidate("d2"), _candidate("d1"), _candidate("p1", role=Role.PREFILL)]
    by_pools = FleetView.of(candidates)
    by_groups = FleetView(by_model={"m": tuple(candidates)})
    assert by_pools.candidates("m") == tuple(sorted(candidates, key=lambda c: c.worker_id))
    assert by_groups.pool("m").decoders == by_pools.pool("m").decoders
    assert by_pools.pool("nope").candidates == () and by_pools.routable_counts("m") == (1, 2)


def test_with_load_keeps_every_other_field() -> None:
    import dataclasses

    from router_svc.candidates import ModelShape

    c = make_candidate(worker_id="w", role=Role.UNIFIED, model="m", endpoint="e:1", node="n", host="h",
                       gpu_type="H100-SXM", gpu_count=2, kv_blocks_total=9, kv_block_size=16, max_batch_size=3,
                       max_context_tokens=77, kv_transports=("tcp",), shape=ModelShape(params=1e9),
                       state=WorkerState.DRAINING)
    load = Load(queued_prefill_tokens=1, active_sequences=2, received_at=12.0)
    assert c.with_load(load) == dataclasses.replace(c, load=load)
