"""The planner's goodput predictor, priced with the router's cost model, on plain values."""

from __future__ import annotations

import math

import pytest

from controlplane.planner import Demand, Slo, WorkerSupply, predict_goodput
from router_svc.costmodel import CostModel, ModelShape

SHAPE = ModelShape()  # Llama-3-8B-like, bf16
SLO = Slo(ttft_s=1.0, inter_token_s=0.05)
COST = CostModel()
PROMPT_HEAVY = Demand(arrival_rps=100.0, prompt_tokens=4096, output_tokens=128)
DECODE_HEAVY = Demand(arrival_rps=100.0, prompt_tokens=512, output_tokens=1024)


def fleet(prefill: int, decode: int, gpu: str = "H100-SXM") -> list[WorkerSupply]:
    return ([WorkerSupply(f"p{i}", gpu, 1, "prefill") for i in range(prefill)]
            + [WorkerSupply(f"d{i}", gpu, 1, "decode") for i in range(decode)])


def predict(workers: list[WorkerSupply], demand: Demand = PROMPT_HEAVY, slo: Slo = SLO):
    return predict_goodput(SHAPE, slo, demand, workers, cost=COST)


def test_more_prefill_workers_serve_more_prompts() -> None:
    capacities = [predict(fleet(n, 2)).prefill_capacity_rps for n in (1, 2, 3, 4)]
    assert capacities == sorted(capacities) and len(set(capacities)) == 4
    # A pooled queue does better than the workers apart: four serve more than four times one's share of the tail.
    assert capacities[3] > 4 * capacities[0]


def test_longer_prompts_lower_prefill_capacity() -> None:
    capacities = [predict(fleet(2, 2), Demand(10.0, prompt, 128)).prefill_capacity_rps for prompt in (512, 2048, 8192)]
    assert capacities[0] > capacities[1] > capacities[2] > 0


def test_tighter_inter_token_target_lowers_decode_capacity() -> None:
    capacities = [predict(fleet(2, 2), DECODE_HEAVY, Slo(1.0, itl)).decode_capacity_rps for itl in (0.02, 0.012, 0.008)]
    assert capacities[0] > capacities[1] > capacities[2] > 0


def test_an_inter_token_target_below_one_step_gives_no_decode_capacity() -> None:
    estimate = predict(fleet(2, 2), DECODE_HEAVY, Slo(1.0, 1e-4))
    assert estimate.decode_capacity_rps == 0 and estimate.goodput_rps == 0 and estimate.bottleneck == "decode"


def test_goodput_is_the_smallest_of_arrival_and_both_capacities_with_the_bottleneck_named() -> None:
    heavy = predict(fleet(1, 3))
    assert heavy.bottleneck == "prefill"
    assert heavy.goodput_rps == pytest.approx(heavy.prefill_capacity_rps)
    assert heavy.ttft_s > SLO.ttft_s
    light = predict(fleet(1, 3), Demand(1.0, 4096, 128))
    assert light.bottleneck == "none" and light.goodput_rps == 1.0
    assert light.ttft_s <= SLO.ttft_s and light.inter_token_s <= SLO.inter_token_s
    decode_bound = predict(fleet(3, 1), DECODE_HEAVY)
    assert decode_bound.bottleneck == "decode"
    assert decode_bound.goodput_rps == pytest.approx(decode_bound.decode_capacity_rps)


def test_ttft_at_the_prefill_capacity_meets_the_target() -> None:
    capacity = predict(fleet(2, 2)).prefill_capacity_rps
    at = predict(fleet(2, 2), Demand(capacity * 0.999, 4096, 128)).ttft_s
    over = predict(fleet(2, 2), Demand(capacity * 1.05, 4096, 128)).ttft_s
    assert at <= SLO.ttft_s < over


def test_no_worker_in_a_role_serves_nothing() -> None:
    for workers in (fleet(0, 4), fleet(4, 0)):
        estimate = predict(workers)
        assert estimate.goodput_rps == 0
    assert predict(fleet(0, 4)).bottleneck == "prefill"
    assert predict(fleet(4, 0)).bottleneck == "decode"


def test_roles_override_the_workers_own() -> None:
    workers = fleet(1, 3)
    flipped = predict_goodput(SHAPE, SLO, PROMPT_HEAVY, workers, roles={"d0": "prefill", "d1": "prefill"}, cost=COST)
    assert flipped == predict(fleet(3, 1))
    with pytest.raises(ValueError, match="role must be"):
        predict_goodput(SHAPE, SLO, PROMPT_HEAVY, workers, roles={"d0": "unified"}, cost=COST)


def test_kv_capacity_limits_decode_concurrency() -> None:
    roomy = predict(fleet(2, 2), DECODE_HEAVY)
    cramped = predict([*fleet(2, 0), *(WorkerSupply(f"d{i}", "H100-SXM", 1, "decode", kv_capacity_tokens=1536 * 8)
                                        for i in range(2))], DECODE_HEAVY)
    assert 0 < cramped.decode_capacity_rps < roomy.decode_capacity_rps / 4


def test_a_model_that_does_not_fit_serves_nothing_there() -> None:
    big = ModelShape(params=70e9)  # 140 GB of bf16 weights on one 48 GB GPU
    workers = [WorkerSupply("p0", "L40S", 1, "prefill"), WorkerSupply("d0", "L40S", 1, "decode")]
    estimate = predict_goodput(big, SLO, PROMPT_HEAVY, workers, cost=COST)
    assert estimate.prefill_capacity_rps == 0 and estimate.decode_capacity_rps == 0 and estimate.goodput_rps == 0


def test_zero_demand_has_zero_goodput_and_no_bottleneck() -> None:
    estimate = predict(fleet(2, 2), Demand(0.0, 0, 0))
    assert estimate.goodput_rps == 0 and estimate.bottleneck == "none"
    idle = predict(fleet(2, 2), Demand(0.0, 2048, 256))
    assert idle.prefill_capacity_rps > 0 and idle.decode_capacity_rps > 0 and not math.isinf(idle.ttft_s)


def test_gpu_strengths_come_from_the_cost_model() -> None:
    """H100 SXM has ~3x an A100's FLOP/s but ~1.6x its bandwidth: relatively better at prefill."""
    h100 = predict(fleet(1, 1, "H100-SXM"), PROMPT_HEAVY)
    a100 = predict(fleet(1, 1, "A100-80GB"), PROMPT_HEAVY)
    prefill_ratio = h100.prefill_capacity_rps / a100.prefill_capacity_rps
    decode_ratio = h100.decode_capacity_rps / a100.decode_capacity_rps
    assert prefill_ratio > 1.3 * decode_ratio > 1.3
