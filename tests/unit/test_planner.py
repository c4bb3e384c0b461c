"""plan_roles: the best assignment, the switching limits and the explanations, on plain values."""

from __future__ import annotations

import dataclasses

import pytest

from controlplane.planner import Demand, Plan, PlannerConfig, Slo, WorkerSupply, plan_roles, predict_goodput
from router_svc.costmodel import CostModel, ModelShape

SHAPE = ModelShape()  # Llama-3-8B-like, bf16
SLO = Slo(ttft_s=1.0, inter_token_s=0.05)
COST = CostModel()
NOW = 1000.0
PROMPT_HEAVY = Demand(arrival_rps=40.0, prompt_tokens=4096, output_tokens=128)
DECODE_HEAVY = Demand(arrival_rps=40.0, prompt_tokens=512, output_tokens=1024)
# Limits off: the plan is the best assignment.
FREE = PlannerConfig(min_gain=0.0, min_dwell_s=0.0, max_switches=100)


def worker(worker_id: str, gpu: str, role: str, **kw: object) -> WorkerSupply:
    return WorkerSupply(worker_id, gpu, 1, role, **kw)  # type: ignore[arg-type]


def mixed_fleet() -> list[WorkerSupply]:
    """4 x A100-80GB and 4 x H100-SXM, half of each on prefill, all in their role for long."""
    return [worker(f"{name}{i}", gpu, "prefill" if i < 2 else "decode")
            for name, gpu in (("a100-", "A100-80GB"), ("h100-", "H100-SXM")) for i in range(4)]


def h100s(prefill: int, decode: int, **kw: object) -> list[WorkerSupply]:
    return ([worker(f"p{i}", "H100-SXM", "prefill", **kw) for i in range(prefill)]
            + [worker(f"d{i}", "H100-SXM", "decode", **kw) for i in range(decode)])


def plan(workers: list[WorkerSupply], demand: Demand = PROMPT_HEAVY, config: PlannerConfig = FREE,
         gpu_blind: bool = False) -> Plan:
    return plan_roles(SHAPE, SLO, demand, workers, now_s=NOW, config=config, cost=COST, gpu_blind=gpu_blind)


def true_goodput(workers: list[WorkerSupply], demand: Demand, roles: dict[str, str] | object) -> float:
    return predict_goodput(SHAPE, SLO, demand, workers, roles=roles, cost=COST).goodput_rps  # type: ignore[arg-type]


def prefill_count(roles: object) -> int:
    return sum(r == "prefill" for r in roles.values())  # type: ignore[attr-defined]


def test_prompt_heavy_demand_plans_more_prefill_workers_than_decode_heavy() -> None:
    heavy_prompts = plan(mixed_fleet(), PROMPT_HEAVY)
    heavy_outputs = plan(mixed_fleet(), DECODE_HEAVY)
    assert prefill_count(heavy_prompts.assignment) > 4 > prefill_count(heavy_outputs.assignment)
    assert heavy_prompts.planned.goodput_rps > heavy_prompts.current.goodput_rps
    assert heavy_outputs.planned.goodput_rps > heavy_outputs.current.goodput_rps


def test_compute_rich_gpus_go_to_prefill_when_prompts_are_long() -> None:
    planned = plan(mixed_fleet(), PROMPT_HEAVY).assignment
    assert all(planned[f"h100-{i}"] == "prefill" for i in range(4))


def test_gpu_blind_planning_loses_goodput_on_a_mixed_fleet() -> None:
    """Same counts, wrong GPUs: the blind planner moves A100s where the H100s belong."""
    workers = mixed_fleet()
    aware = plan(workers, PROMPT_HEAVY)
    blind = plan(workers, PROMPT_HEAVY, gpu_blind=True)
    aware_goodput = true_goodput(workers, PROMPT_HEAVY, aware.assignment)
    blind_goodput = true_goodput(workers, PROMPT_HEAVY, blind.assignment)
    assert aware_goodput > 1.2 * blind_goodput
    assert aware.planned.goodput_rps == pytest.approx(aware_goodput)


def test_gpu_blind_planning_loses_goodput_with_l40s_and_h100() -> None:
    """L40S: H100-class FLOP/s share, a quarter of its bandwidth; the cost model sends it to prefill."""
    workers = [worker("h100-0", "H100-SXM", "prefill"), worker("h100-1", "H100-SXM", "decode"),
               worker("l40s-0", "L40S", "prefill"), worker("l40s-1", "L40S", "decode")]
    aware = plan(workers, PROMPT_HEAVY)
    blind = plan(workers, PROMPT_HEAVY, gpu_blind=True)
    assert aware.assignment["l40s-0"] == aware.assignment["l40s-1"] == "prefill"
    assert aware.assignment["h100-1"] == "decode"
    assert true_goodput(workers, PROMPT_HEAVY, aware.assignment) > 1.5 * true_goodput(workers, PROMPT_HEAVY,
                                                                                        blind.assignment)


def test_planned_estimate_is_the_predictors_and_never_below_current() -> None:
    for demand in (PROMPT_HEAVY, DECODE_HEAVY, dataclasses.replace(PROMPT_HEAVY, arrival_rps=3.0)):
        for config in (FREE, PlannerConfig(min_dwell_s=0.0)):
            p = plan(mixed_fleet(), demand, config)
            assert p.planned == predict_goodput(SHAPE, SLO, demand, mixed_fleet(), roles=p.assignment, cost=COST)
            assert p.planned.goodput_rps >= p.current.goodput_rps
            assert p.best.goodput_rps >= p.planned.goodput_rps


def test_a_fleet_that_meets_demand_is_left_alone() -> None:
    light = dataclasses.replace(PROMPT_HEAVY, arrival_rps=3.0)
    p = plan(mixed_fleet(), light)
    assert p.changes == () and p.current.bottleneck == "none"
    assert "no change" in p.explanation


def _prefill_bound() -> tuple[list[WorkerSupply], Demand]:
    """One prefill worker short of demand by 5 %: a second one would gain 5 %."""
    workers = h100s(1, 3)
    capacity = predict_goodput(SHAPE, SLO, PROMPT_HEAVY, workers, cost=COST).prefill_capacity_rps
    return workers, dataclasses.replace(PROMPT_HEAVY, arrival_rps=capacity * 1.05)


def test_hysteresis_holds_a_small_gain() -> None:
    workers, demand = _prefill_bound()
    held = plan(workers, demand, PlannerConfig(min_gain=0.10, min_dwell_s=0.0))
    assert held.changes == () and held.assignment == {w.worker_id: w.role for w in workers}
    assert held.best.goodput_rps == pytest.approx(demand.arrival_rps)
    assert any("hysteresis" in h for h in held.held) and "less than 10% above" in held.explanation
    taken = plan(workers, demand, PlannerConfig(min_gain=0.01, min_dwell_s=0.0))
    assert [(c.from_role, c.to_role) for c in taken.changes] == [("decode", "prefill")]


def test_a_fleet_missing_its_slo_takes_a_small_gain() -> None:
    # The same 5 % shortfall, but the routers report TTFT p90 over the target: a queue is building.
    workers, demand = _prefill_bound()
    missing = dataclasses.replace(demand, ttft_p90_s=SLO.ttft_s * 3)
    moved = plan(workers, missing, PlannerConfig(min_gain=0.10, min_dwell_s=0.0))
    assert [(c.from_role, c.to_role) for c in moved.changes] == [("decode", "prefill")]
    # Within the SLO as measured, the hysteresis holds as before.
    within = dataclasses.replace(demand, ttft_p90_s=SLO.ttft_s / 2, inter_token_p90_s=SLO.inter_token_s / 2)
    assert plan(workers, within, PlannerConfig(min_gain=0.10, min_dwell_s=0.0)).changes == ()


def test_a_worker_within_its_dwell_does_not_move() -> None:
    workers = h100s(1, 3, role_since_s=NOW - 10)
    p = plan(workers, PROMPT_HEAVY, PlannerConfig(min_gain=0.0))
    assert p.changes == ()
    assert "d0: dwell 10 s < 60 s" in p.held and "dwell" in p.explanation
    # One decode worker has served long enough: it is the one that moves.
    workers[2] = dataclasses.replace(workers[2], role_since_s=0.0)
    moved = plan(workers, PROMPT_HEAVY, PlannerConfig(min_gain=0.0))
    assert [c.worker_id for c in moved.changes] == [workers[2].worker_id]


def test_another_gpu_type_stands_in_for_dwelling_workers() -> None:
    workers = [dataclasses.replace(w, role_since_s=NOW - 10) if w.worker_id in ("h100-2", "h100-3") else w
               for w in mixed_fleet()]
    p = plan(workers, PROMPT_HEAVY, dataclasses.replace(FREE, min_dwell_s=60.0))
    assert {"h100-2: dwell 10 s < 60 s", "h100-3: dwell 10 s < 60 s"} <= set(p.held)
    assert p.changes and all(c.worker_id.startswith("a100-") and c.to_role == "prefill" for c in p.changes)
    assert p.planned.goodput_rps > p.current.goodput_rps


def test_the_worker_longest_in_its_role_moves_first() -> None:
    workers = [dataclasses.replace(w, role_since_s=since) for w, since in zip(h100s(1, 3), (0, 500, 100, 300),
                                                                                strict=True)]
    p = plan(workers, PROMPT_HEAVY, PlannerConfig(min_gain=0.0, max_switches=1))
    assert [c.worker_id for c in p.changes] == ["d1"]  # in decode since t=100, the longest of d0..d2
    assert "longest in its role" in p.changes[0].why


def test_at_most_max_switches_move_per_round() -> None:
    demand = dataclasses.replace(PROMPT_HEAVY, arrival_rps=200.0)
    workers = h100s(1, 7)
    best = plan(workers, demand)
    wanted = sum(1 for w in workers if best.best_assignment[w.worker_id] != w.role)
    assert wanted >= 3
    one = plan(workers, demand, PlannerConfig(min_dwell_s=0.0, max_switches=1))
    assert len(one.changes) == 1 and any("at most 1 switch per round" in h for h in one.held)
    three = plan(workers, demand, PlannerConfig(min_dwell_s=0.0, max_switches=3))
    assert len(three.changes) == 3
    assert one.current.goodput_rps < one.planned.goodput_rps < three.planned.goodput_rps <= best.best.goodput_rps


def test_minimums_hold_even_when_demand_wants_otherwise() -> None:
    demand = dataclasses.replace(PROMPT_HEAVY, arrival_rps=500.0, output_tokens=16)
    p = plan(h100s(1, 3), demand, dataclasses.replace(FREE, min_decode_workers=2))
    assert prefill_count(p.best_assignment) == 2 and prefill_count(p.assignment) == 2


def test_minimums_are_restored_without_demand_and_without_hysteresis() -> None:
    p = plan(h100s(0, 3), Demand(0.0, 0, 0), PlannerConfig())
    assert prefill_count(p.assignment) == 1 and len(p.changes) == 1


def test_non_switchable_workers_keep_their_role() -> None:
    workers = h100s(1, 3)
    workers[1] = dataclasses.replace(workers[1], switchable=False)  # d0
    p = plan(workers, dataclasses.replace(PROMPT_HEAVY, arrival_rps=200.0))
    assert p.assignment["d0"] == p.best_assignment["d0"] == "decode"
    assert p.changes and all(c.worker_id != "d0" for c in p.changes)


def test_zero_demand_keeps_every_role_and_says_why() -> None:
    workers = mixed_fleet()
    for demand in (Demand(0.0, 0, 0), Demand(0.0, 4096, 128), Demand(5.0, 0, 0)):
        p = plan(workers, demand)
        assert p.changes == () and p.assignment == {w.worker_id: w.role for w in workers}
        assert "no demand" in p.explanation


def test_explanation_and_reasons_name_what_moves_and_why() -> None:
    p = plan(mixed_fleet(), PROMPT_HEAVY, PlannerConfig(min_dwell_s=0.0, max_switches=1))
    (change,) = p.changes
    assert change.worker_id.startswith("h100-") and (change.from_role, change.to_role) == ("decode", "prefill")
    assert "saw 40 req/s, prompts 4096 tok, outputs 128 tok" in p.explanation
    assert "prefill-bound" in p.explanation
    assert f"{change.worker_id} (H100-SXM) decode->prefill" in p.explanation
    assert "compute-rich H100-SXM to prefill" in change.why and "prompts 4096 tok" in change.why
    assert "\n" not in p.explanation


def test_duplicate_worker_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        plan([worker("w", "H100-SXM", "prefill"), worker("w", "H100-SXM", "decode")])


def test_local_search_beyond_the_enumeration_limit_finds_the_same_best_here() -> None:
    for demand in (PROMPT_HEAVY, DECODE_HEAVY):
        exhaustive = plan(mixed_fleet(), demand)
        climbed = plan(mixed_fleet(), demand, dataclasses.replace(FREE, max_enumerated=1))
        assert climbed.best.goodput_rps == pytest.approx(exhaustive.best.goodput_rps)
        assert climbed.planned == predict_goodput(SHAPE, SLO, demand, mixed_fleet(), roles=climbed.assignment,
                                                  cost=COST)


def test_rounds_one_switch_at_a_time_reach_the_best_without_ever_losing_goodput() -> None:
    workers = mixed_fleet()
    target = plan(workers, PROMPT_HEAVY).best.goodput_rps
    now, seen = NOW, []
    for _ in range(20):
        p = plan_roles(SHAPE, SLO, PROMPT_HEAVY, workers, now_s=now, config=PlannerConfig(), cost=COST)
        assert len(p.changes) <= 1 and p.planned.goodput_rps >= p.current.goodput_rps
        seen.append(p.planned.goodput_rps)
        moved = {c.worker_id: c.to_role for c in p.changes}
        workers = [dataclasses.replace(w, role=moved[w.worker_id], role_since_s=now) if w.worker_id in moved else w
                   for w in workers]
        now += 30.0
    assert seen == sorted(seen) and seen[-1] == pytest.approx(target)
