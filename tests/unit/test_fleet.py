"""Admin answers from registry records: counts, routability, GPU holders, lease holders."""

from __future__ import annotations

from controlplane.fleet import (
    Snapshot,
    fleet_status,
    gpu_index,
    gpu_problem,
    gpu_statuses,
    known_nodes,
    lease_holder,
    node_statuses,
    routable,
    worker_statuses,
)
from registry.election import leader_entry
from registry.keys import KeyRef, Kind
from registry.records import Entry
from tandem.v1 import admin_pb2, common_pb2, registry_pb2

PREFILL, DECODE, UNIFIED = common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE, common_pb2.ROLE_UNIFIED
READY, STARTING = registry_pb2.WORKER_STATE_READY, registry_pb2.WORKER_STATE_STARTING
FAILED = registry_pb2.GPU_HEALTH_FAILED


def node(name: str, models: list[tuple[str, str]], *, simulated: bool = False,
         failed: tuple[int, ...] = ()) -> registry_pb2.NodeRecord:
    gpus = [registry_pb2.GpuInfo(index=i, uuid=f"GPU-{name}-{i}", name=nvml, catalog_id=catalog,
                                 health=FAILED if i in failed else registry_pb2.GPU_HEALTH_OK,
                                 health_reason="XID 79" if i in failed else "")
            for i, (nvml, catalog) in enumerate(models)]
    return registry_pb2.NodeRecord(node=name, gpus=gpus, simulated=simulated)


def worker(worker_id: str, role: int, node_name: str, gpus: list[str], *, state: int = READY,
           gpu_type: str = "", simulated: bool = False) -> registry_pb2.WorkerRecord:
    return registry_pb2.WorkerRecord(worker_id=worker_id, role=role, node=node_name, gpu_uuids=gpus, state=state,  # type: ignore[arg-type]
                                     gpu_type=gpu_type, model="m", simulated=simulated)


def claims_of(*records: registry_pb2.WorkerRecord) -> dict[str, registry_pb2.GpuClaim]:
    return {u: registry_pb2.GpuClaim(gpu_uuid=u, worker_id=w.worker_id, role=w.role, node=w.node)
            for w in records for u in w.gpu_uuids}


def verdict(worker_id: str, status: int) -> registry_pb2.HealthVerdict:
    return registry_pb2.HealthVerdict(worker_id=worker_id, status=status)  # type: ignore[arg-type]


H100 = ("NVIDIA H100 80GB HBM3", "H100-SXM")
L40S = ("NVIDIA L40S", "")


def mixed_fleet() -> Snapshot:
    nodes = {"a": node("a", [H100] * 4, failed=(3,)), "b": node("b", [L40S] * 2, simulated=True)}
    workers = {
        "p0": worker("p0", PREFILL, "a", ["GPU-a-0", "GPU-a-1"]),
        "d0": worker("d0", DECODE, "a", ["GPU-a-2"]),
        "u0": worker("u0", UNIFIED, "b", ["GPU-b-0"]),
        # No agent on node c: its GPU is known only from the worker and its claim.
        "d1": worker("d1", DECODE, "c", ["SIM-c-0"], gpu_type="A100-SXM", simulated=True),
        "s0": worker("s0", DECODE, "b", [], state=STARTING),
    }
    return Snapshot(
        nodes=nodes, workers=workers, claims=claims_of(*workers.values()),
        health={"d0": verdict("d0", registry_pb2.SERVING_STATUS_NOT_SERVING),
                "p0": verdict("p0", registry_pb2.SERVING_STATUS_SERVING)},
        drains={"u0": registry_pb2.DrainIntent(worker_id="u0")},
        cordons={"c": registry_pb2.CordonIntent(node="c")},
    )


def test_fleet_rows_by_model_with_roles_idle_unhealthy_and_simulated() -> None:
    status = fleet_status(mixed_fleet())
    assert list(status.gpu_models) == [
        admin_pb2.GpuModelSummary(gpu_model="A100-SXM", total=1, decode=1, simulated=1),
        # GPU 3 failed (idle), GPU 2 held by a NOT_SERVING decode worker.
        admin_pb2.GpuModelSummary(gpu_model="H100-SXM", total=4, prefill=2, decode=1, idle=1, unhealthy=2),
        # Unmatched in the catalog: named by NVML.
        admin_pb2.GpuModelSummary(gpu_model="NVIDIA L40S", total=2, unified=1, idle=1, simulated=2),
    ]
    assert (status.nodes, status.cordoned_nodes, status.workers, status.workers_ready) == (2, 1, 5, 4)
    assert (status.workers_draining, status.workers_not_serving) == (1, 1)


def test_routable_needs_ready_no_drain_no_cordon_and_not_not_serving() -> None:
    snapshot = mixed_fleet()
    verdicts = {w: routable(snapshot, snapshot.workers[w]) for w in snapshot.workers}
    # p0 SERVING; d0 NOT_SERVING; u0 drained; d1 on a cordoned node; s0 still starting.
    assert verdicts == {"p0": True, "d0": False, "u0": False, "d1": False, "s0": False}
    no_verdict = Snapshot(workers={"x": worker("x", DECODE, "n", [])})
    assert routable(no_verdict, no_verdict.workers["x"]), "no verdict yet routes like SERVING"


def test_list_workers_filters_and_carries_intents() -> None:
    rows = worker_statuses(mixed_fleet(), role=DECODE)
    assert [r.record.worker_id for r in rows] == ["d0", "d1", "s0"]
    d0, d1, _ = rows
    assert d0.health.status == registry_pb2.SERVING_STATUS_NOT_SERVING and not d0.HasField("drain")
    assert d1.node_cordoned and not d1.HasField("health")
    assert [r.record.worker_id for r in worker_statuses(mixed_fleet(), node="b")] == ["s0", "u0"]
    assert worker_statuses(mixed_fleet(), model="other") == []
    (u0,) = worker_statuses(mixed_fleet(), node="b", role=UNIFIED)
    assert u0.HasField("drain") and not u0.routable


def test_list_gpus_joins_inventory_with_claims() -> None:
    rows = gpu_statuses(mixed_fleet(), node="a")
    assert [(g.gpu.uuid, g.worker_id, g.role) for g in rows] == [
        ("GPU-a-0", "p0", PREFILL), ("GPU-a-1", "p0", PREFILL), ("GPU-a-2", "d0", DECODE), ("GPU-a-3", "", 0)]
    assert rows[3].gpu.health == FAILED
    (agentless,) = gpu_statuses(mixed_fleet(), node="c")
    assert (agentless.gpu.catalog_id, agentless.worker_id, agentless.simulated) == ("A100-SXM", "d1", True)


def test_claim_wins_over_a_worker_listing_the_same_gpu() -> None:
    liar = worker("liar", PREFILL, "a", ["GPU-a-0"])
    holder = worker("holder", DECODE, "a", ["GPU-a-0"])
    snapshot = Snapshot(nodes={"a": node("a", [H100])}, workers={"liar": liar, "holder": holder},
                        claims=claims_of(holder))
    (row,) = gpu_statuses(snapshot)
    assert (row.worker_id, row.role) == ("holder", DECODE)


def test_gpu_problem_names_each_failed_gpu() -> None:
    index = gpu_index({"a": node("a", [H100] * 3, failed=(1, 2))})
    held = worker("w", DECODE, "a", ["GPU-a-0", "GPU-a-1", "GPU-a-2"])
    assert gpu_problem(held, index) == "GPU-a-1 health FAILED: XID 79; GPU-a-2 health FAILED: XID 79"
    assert gpu_problem(worker("v", DECODE, "a", ["GPU-a-0", "GPU-zz"]), index) == ""


def test_nodes_list_cordons_and_known_nodes_include_agentless_ones() -> None:
    rows = node_statuses(mixed_fleet())
    assert [(r.record.node, r.cordoned) for r in rows] == [("a", False), ("b", False)]
    assert known_nodes(mixed_fleet()) == {"a", "b", "c"}


def test_leader_is_the_lowest_create_revision() -> None:
    def candidacy(name: str, create_revision: int, replica: str) -> Entry:
        return Entry(Kind.ELECTION, name, registry_pb2.LeaderRecord(replica_id=replica), create_revision,
                     create_revision, 7)

    entries = [candidacy("00000000000000bb", 12, "late"), candidacy("00000000000000aa", 9, "first")]
    leader = leader_entry(entries)
    assert leader is not None and leader.record.replica_id == "first"
    assert leader_entry([]) is None


def test_lease_holder_names_from_keys() -> None:
    leaders = {"00000000000000aa": registry_pb2.LeaderRecord(replica_id="cp-1")}
    claims = {"GPU-1": registry_pb2.GpuClaim(worker_id="p-0")}
    assert lease_holder([KeyRef(Kind.ELECTION, "00000000000000aa"), KeyRef(Kind.HEALTH, "p-0")],
                        leaders, claims) == "control plane cp-1"
    assert lease_holder([KeyRef(Kind.WORKER, "p-0"), KeyRef(Kind.GPU_CLAIM, "GPU-1")], leaders, claims) == "worker p-0"
    assert lease_holder([KeyRef(Kind.NODE, "gpu-3")], leaders, claims) == "node gpu-3"
    assert lease_holder([KeyRef(Kind.GPU_CLAIM, "GPU-1")], leaders, claims) == "worker p-0"
    assert lease_holder([], leaders, claims) == ""
