"""The router's CostModel prices with the calibrated step model: plain values, no servers."""

from __future__ import annotations

import pytest

from engine.sim import get_profile, gpu_set, prefill_seconds, step_seconds
from router_svc.candidates import Candidate, Load, ModelShape, Role, make_candidate
from router_svc.costmodel import QUEUE_CHUNK_TOKENS, CostConfig, CostModel, model_dims
from runtime.stepparams import default_step_params

L70 = get_profile("llama-3-70b")
SHAPE_70 = ModelShape(params=L70.active_params, kv_bytes_per_token=L70.kv_bytes_per_token,
                      bytes_per_param=L70.weight_bytes / L70.total_params)


def worker(gpu: str = "H100-SXM", count: int = 4, *, queued: int = 0, active: int = 0, kv_used: int = 0) -> Candidate:
    load = Load(queued_prefill_tokens=queued, active_sequences=active, kv_blocks_used=kv_used, kv_blocks_total=100_000,
                kv_block_size=16, received_at=0.0)
    return make_candidate(worker_id=f"{gpu}-{count}", role=Role.DECODE, model="m", endpoint="e:1", load=load,
                          gpu_type=gpu, gpu_count=count, kv_blocks_total=100_000, kv_block_size=16)


def test_layers_and_width_are_estimated_from_the_parameter_count() -> None:
    dims = model_dims(SHAPE_70)
    assert dims.num_layers == 80 and dims.hidden_size == pytest.approx(8192, rel=0.05)
    small = model_dims(ModelShape())  # the default 8B shape
    assert small.num_layers == 33 and small.hidden_size == pytest.approx(4096, rel=0.1)


def test_a_decode_step_matches_the_sim_engines_within_the_shape_estimate() -> None:
    # The router and the sim engine time steps with one model; the router only estimates layers and width.
    cost = CostModel()
    router = cost.step_s(worker(), SHAPE_70, 64, 64 * 3001)
    sim = step_seconds(gpu_set("H100-SXM", 4), L70, [(1, 3000)] * 64)
    assert router == pytest.approx(sim, rel=0.05)


def test_prompts_are_priced_per_token_like_the_queue() -> None:
    cost = CostModel()
    c = worker()
    per_token = cost.prefill_s(c, QUEUE_CHUNK_TOKENS, SHAPE_70) / QUEUE_CHUNK_TOKENS
    assert cost.prefill_s(c, 4000, SHAPE_70) == pytest.approx(4000 * per_token)
    assert cost.prefill_queue_s(worker(queued=6000), SHAPE_70) == pytest.approx(6000 * per_token)
    # One 2048-token chunk: what the sim engine charges for it alone.
    sim = prefill_seconds(gpu_set("H100-SXM", 4), L70, QUEUE_CHUNK_TOKENS)
    assert per_token * QUEUE_CHUNK_TOKENS == pytest.approx(sim, rel=0.05)


def test_queued_prompts_on_a_decode_worker_slow_its_tokens() -> None:
    # Interference: prompts prefilled beside the batch lengthen the steps this request shares.
    cost = CostModel()
    quiet = cost.inter_token_s(worker(active=32, kv_used=32 * 200), SHAPE_70, 3000, 150)
    busy = cost.inter_token_s(worker(active=32, kv_used=32 * 200, queued=9000), SHAPE_70, 3000, 150)
    # Each queued prompt stalls the steps it shares for about its own prefill time, spread over 150 tokens.
    assert busy - quiet > 0.8 * cost.prefill_queue_s(worker(queued=9000), SHAPE_70) / 150


def test_longer_contexts_cost_more_per_step() -> None:
    cost = CostModel()
    c = worker()
    assert cost.step_s(c, SHAPE_70, 64, 64 * 8000) > 1.3 * cost.step_s(c, SHAPE_70, 64, 64 * 500)


def test_tensor_parallel_all_reduces_cost_more_over_pcie_than_nvlink() -> None:
    # Same peak rates per GPU set: 2 x H100-SXM (NVLink 900 GB/s) vs the PCIe part at its recorded 128 GB/s.
    cost = CostModel()
    sxm = cost.prefill_s(worker("H100-SXM", 2), 4000, SHAPE_70)
    pcie = cost.prefill_s(worker("H100-PCIE", 2), 4000, SHAPE_70)
    assert pcie > sxm * 989 / 756  # more than the compute ratio alone


def test_fitted_parameters_apply_per_gpu_type_and_overrides_win() -> None:
    fitted = default_step_params()
    cost = CostModel()
    assert cost.step_params("H100-SXM") == fitted.for_gpu("H100-SXM")
    assert cost.step_params("A100-80GB") == fitted.for_gpu("default")
    assert cost.step_params("no-such-gpu").mfu == fitted.for_gpu("default").mfu
    forced = CostModel(config=CostConfig(compute_efficiency=0.3, bandwidth_efficiency=0.4))
    assert (forced.step_params("H100-SXM").mfu, forced.step_params("H100-SXM").mbu) == (0.3, 0.4)
    assert forced.flops(worker()) == pytest.approx(989e12 * 4 * 0.3)
    assert forced.bandwidth(worker()) == pytest.approx(3.35e12 * 4 * 0.4)


def test_h100_beats_a100_at_prefill_and_decode() -> None:
    cost = CostModel()
    h100, a100 = worker("H100-SXM"), worker("A100-80GB")
    assert cost.prefill_s(h100, 3000, SHAPE_70) < cost.prefill_s(a100, 3000, SHAPE_70) / 2
    assert cost.step_s(h100, SHAPE_70, 32, 32 * 3000) < cost.step_s(a100, SHAPE_70, 32, 32 * 3000)
