"""controlplane.planner.inputs: registry records in, planner values out, PlanRecord back. Plain values."""

from __future__ import annotations

import pytest

from controlplane.planner import PlannerConfig, plan_roles
from controlplane.planner.inputs import (
    DEFAULT_SLO,
    merged_demand,
    plan_record,
    planned_workers,
    planner_demand,
    role_intents,
    shape_of,
    slo_of,
    supply_of,
)
from tandem.v1 import common_pb2, registry_pb2

P, D = common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE
BOTH = [P, D]


def _worker(worker_id: str, role: int, *, gpu: str = "H100-SXM", state: int = registry_pb2.WORKER_STATE_READY,
            model: str = "m", since_ms: int = 1_000_000, switchable: bool = True) -> registry_pb2.WorkerRecord:
    return registry_pb2.WorkerRecord(
        worker_id=worker_id, role=role, model=model, gpu_type=gpu, gpu_count=1, state=state,
        switchable_roles=BOTH if switchable else [], role_since_unix_ms=since_ms,
        capacity=registry_pb2.WorkerCapacity(kv_blocks_total=1000, kv_block_size_tokens=16, max_batch_size=64))


def _report(router: str, *models: registry_pb2.ModelDemand) -> registry_pb2.DemandReport:
    return registry_pb2.DemandReport(router_id=router, window_s=60, models=list(models))


def test_demand_from_several_routers_adds_rates_and_weights_means() -> None:
    a = registry_pb2.ModelDemand(model="m", requests=30, arrival_rate_rps=3.0, finished=30, prompt_tokens_mean=100,
                                 output_tokens_mean=50, ttft_ms_p90=200, prompt_tokens_p90=150)
    b = registry_pb2.ModelDemand(model="m", requests=10, arrival_rate_rps=1.0, finished=10, prompt_tokens_mean=500,
                                 output_tokens_mean=10, ttft_ms_p90=900, prompt_tokens_p90=700)
    other = registry_pb2.ModelDemand(model="other", requests=99, arrival_rate_rps=9.9)
    merged = merged_demand("m", [_report("r1", a, other), _report("r2", b)])
    assert merged.arrival_rate_rps == pytest.approx(4.0)
    assert merged.requests == 40
    assert merged.prompt_tokens_mean == pytest.approx((30 * 100 + 10 * 500) / 40)
    assert merged.output_tokens_mean == pytest.approx((30 * 50 + 10 * 10) / 40)
    # Percentiles do not merge: the worst router's stands (never optimistic).
    assert merged.ttft_ms_p90 == 900 and merged.prompt_tokens_p90 == 700
    assert merged_demand("none", [_report("r1", a)]).arrival_rate_rps == 0
    demand = planner_demand(merged)
    assert demand.arrival_rps == pytest.approx(4.0) and demand.prompt_tokens == pytest.approx(200)


def test_a_report_with_impossible_figures_is_left_out() -> None:
    good = registry_pb2.ModelDemand(model="m", requests=10, arrival_rate_rps=2.0, finished=10, prompt_tokens_mean=100,
                                    output_tokens_mean=10)
    nan = registry_pb2.ModelDemand(model="m", requests=10, arrival_rate_rps=float("nan"), finished=10)
    negative = registry_pb2.ModelDemand(model="m", requests=10, arrival_rate_rps=-5.0, finished=10)
    huge = registry_pb2.ModelDemand(model="m", requests=10, arrival_rate_rps=1.0, ttft_ms_p90=float("inf"))
    merged = merged_demand("m", [_report("r1", good), _report("r2", nan), _report("r3", negative),
                                 _report("r4", huge)])
    assert merged.arrival_rate_rps == pytest.approx(2.0) and merged.requests == 10


def test_slo_from_the_spec_with_defaults_for_what_it_leaves_unset() -> None:
    spec = registry_pb2.ModelSpec(name="m", slo=registry_pb2.ServiceLevelObjectives(ttft_ms=250))
    slo = slo_of(spec)
    assert slo.ttft_s == pytest.approx(0.25) and slo.inter_token_s == DEFAULT_SLO.inter_token_s
    assert slo_of(None) == DEFAULT_SLO


def test_supply_counts_serving_and_switching_workers_of_the_model_only() -> None:
    records = [
        _worker("p0", P), _worker("d0", D), _worker("d1", D, state=registry_pb2.WORKER_STATE_SWITCHING),
        _worker("d2", D, state=registry_pb2.WORKER_STATE_STARTING),
        _worker("d3", D, state=registry_pb2.WORKER_STATE_DRAINING),
        _worker("x0", D, model="other"),
        _worker("u0", common_pb2.ROLE_UNIFIED),
    ]
    workers = planned_workers("m", records)
    assert [w.worker_id for w in workers] == ["d0", "d1", "p0"]
    supply = {s.worker_id: s for s in supply_of(workers, {})}
    assert supply["p0"].role == "prefill" and supply["d0"].role == "decode"
    assert supply["p0"].kv_capacity_tokens == 16_000 and supply["p0"].max_batch_size == 64
    assert supply["p0"].role_since_s == pytest.approx(1000.0)


def test_a_pending_intent_counts_in_its_role_from_its_time() -> None:
    intent = registry_pb2.RoleIntent(worker_id="d0", role=P, requested_at_unix_ms=5_000_000)
    fixed = registry_pb2.RoleIntent(worker_id="f0", role=P, requested_at_unix_ms=5_000_000)
    records = [_worker("d0", D), _worker("f0", D, switchable=False)]
    supply = {s.worker_id: s for s in supply_of(records, {"d0": intent, "f0": fixed})}
    assert supply["d0"].role == "prefill" and supply["d0"].role_since_s == pytest.approx(5000.0)
    # A worker that cannot switch keeps its role whatever the intent says.
    assert supply["f0"].role == "decode" and not supply["f0"].switchable


def test_shape_is_what_the_workers_publish() -> None:
    record = _worker("d0", D)
    assert shape_of([record]).params == pytest.approx(8e9)  # none published: the cost model's default
    record.model_shape.CopyFrom(registry_pb2.ModelShape(total_params=70e9, active_params=70e9, weight_bytes=140e9,
                                                        kv_bytes_per_token=327_680, num_layers=80))
    assert shape_of([_worker("p0", P), record]).params == pytest.approx(70e9)


def test_plan_record_and_intents_say_what_changes_and_why() -> None:
    records = [_worker("p0", P), _worker("d0", D), _worker("d1", D), _worker("d2", D)]
    supply = supply_of(records, {})
    demand = registry_pb2.ModelDemand(model="m", requests=600, arrival_rate_rps=10.0, finished=600,
                                      prompt_tokens_mean=8000, output_tokens_mean=16)
    slo = slo_of(None)
    plan = plan_roles(shape_of(records), slo, planner_demand(demand), supply, now_s=10_000.0,
                      config=PlannerConfig(min_dwell_s=0))
    assert plan.changes, plan.explanation  # long prompts, short outputs, one prefill worker: move one
    record = plan_record("m", plan, generation=7, planner="cp-0", mode="enact", now_ms=10_000_000, demand=demand,
                         slo=slo, supply=supply)
    assert record.generation == 7 and record.mode == "enact" and record.explanation
    moved = [w for w in record.workers if w.current_role != w.planned_role]
    assert [w.worker_id for w in moved] == [c.worker_id for c in plan.changes]
    assert all(w.why for w in record.workers)
    assert record.planned_goodput_rps >= record.current_goodput_rps
    intents = role_intents(plan, planner="cp-0", generation=7, now_ms=10_000_000)
    assert [(i.worker_id, i.role, i.plan_generation, i.requested_by) for i in intents] == \
        [(c.worker_id, P, 7, "planner:cp-0") for c in plan.changes]
