"""The model's shape, as its workers publish it, prices the request: plain values, no servers."""

from __future__ import annotations

import math

import pytest

from engine.sim.profiles import get_profile
from router_svc.candidates import Candidate, FleetView, Load, ModelShape, Role
from router_svc.candidates_pb import candidate_from_pb, shape_from_pb
from router_svc.policies import create_policy
from router_svc.policy import RouteRequest
from tandem.v1 import common_pb2, registry_pb2
from worker.registration import model_shape_to_pb

NOW = 100.0
SMALL, LARGE = "llama-3-8b", "llama-3-70b"
ROLES = {Role.DECODE: common_pb2.ROLE_DECODE, Role.PREFILL: common_pb2.ROLE_PREFILL}


def published(model: str, worker_id: str, role: Role, gpu: str, host: str) -> Candidate:
    """A worker of `model` as the router sees it: its record (with the sim profile's shape) and a fresh load."""
    record = registry_pb2.WorkerRecord(
        worker_id=worker_id, role=ROLES[role], model=model, endpoint=f"{worker_id}:1", host=host, gpu_type=gpu,
        gpu_count=2, state=registry_pb2.WORKER_STATE_READY,
        capacity=registry_pb2.WorkerCapacity(kv_blocks_total=10_000, kv_block_size_tokens=16, max_batch_size=64),
        model_shape=model_shape_to_pb(get_profile(model).model_shape()))
    candidate = candidate_from_pb(record, load=Load(kv_blocks_total=10_000, kv_block_size=16, received_at=NOW))
    assert candidate is not None
    return candidate


def fleet() -> FleetView:
    # Per model: a decode worker on host a, a prefill worker beside it on slower
    # GPUs (H200 NVL: 835 TFLOP/s) and one on another host on faster ones (H200: 989).
    # Prefilling beside the decoder saves moving the KV cache; prefilling far saves compute.
    # Which saves more depends on the model: KV bytes per token against parameters.
    return FleetView.of(
        published(model, f"{model}-{name}", role, gpu, host)
        for model in (SMALL, LARGE)
        for name, role, gpu, host in (("d", Role.DECODE, "H200", "a"), ("p-near", Role.PREFILL, "H200-NVL", "a"),
                                      ("p-far", Role.PREFILL, "H200", "b"))
    )


def test_the_published_shape_reaches_the_candidate() -> None:
    profile = get_profile(LARGE)
    shape = fleet().candidates(LARGE)[0].shape
    assert shape == ModelShape(params=profile.active_params, kv_bytes_per_token=profile.kv_bytes_per_token,
                               bytes_per_param=profile.weight_bytes / profile.total_params,
                               num_layers=profile.num_layers)
    record = registry_pb2.WorkerRecord(worker_id="old", role=common_pb2.ROLE_DECODE, model="m", endpoint="x:1")
    old = candidate_from_pb(record)
    assert old is not None and old.shape is None, "a record without a shape (an older worker) has none"


@pytest.mark.parametrize("bad", [
    registry_pb2.ModelShape(),
    registry_pb2.ModelShape(active_params=-1.0, kv_bytes_per_token=10),
    registry_pb2.ModelShape(active_params=math.nan),
    registry_pb2.ModelShape(active_params=math.inf),
])
def test_an_unusable_shape_is_ignored_not_fatal(bad: registry_pb2.ModelShape) -> None:
    assert shape_from_pb(bad) is None


def test_a_shape_with_odd_weight_figures_falls_back_to_two_bytes_a_parameter() -> None:
    odd = shape_from_pb(registry_pb2.ModelShape(active_params=1e9, total_params=math.inf, weight_bytes=math.inf))
    assert odd is not None and odd.bytes_per_param == 2.0


def test_two_models_in_one_fleet_route_by_their_own_size() -> None:
    policy = create_policy("expected-time")
    view = fleet()
    small = policy.choose(RouteRequest(model=SMALL, prompt_tokens=2000, max_tokens=64), view, NOW)
    large = policy.choose(RouteRequest(model=LARGE, prompt_tokens=2000, max_tokens=64), view, NOW)
    # 8B: 128 KiB of KV per token for 7.5B active parameters: moving the KV costs more than the slower prefill.
    assert small.prefill is not None and small.prefill.worker_id == f"{SMALL}-p-near"
    # 70B: 320 KiB per token for 69.5B parameters: compute dominates, the faster GPUs win.
    assert large.prefill is not None and large.prefill.worker_id == f"{LARGE}-p-far"
    assert small.shape.params == pytest.approx(get_profile(SMALL).active_params)
    assert large.shape.params == pytest.approx(get_profile(LARGE).active_params)
    assert large.estimates.prefill_s > 5 * small.estimates.prefill_s


def test_priced_as_the_default_8b_the_70b_would_go_to_the_slower_gpus() -> None:
    # What the router did before workers published their shape.
    request = RouteRequest(model=LARGE, prompt_tokens=2000, max_tokens=64, shape=ModelShape())
    decision = create_policy("expected-time").choose(request, fleet(), NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == f"{LARGE}-p-near"
    assert decision.shape == ModelShape()


def test_mid_rollout_the_shape_most_workers_publish_wins() -> None:
    view = fleet()
    odd = ModelShape(params=1e9)
    workers = list(view.candidates(SMALL))
    workers[0] = Candidate(**{**{f: getattr(workers[0], f) for f in Candidate.__slots__}, "shape": odd})
    decision = create_policy("expected-time").choose(
        RouteRequest(model=SMALL, prompt_tokens=2000, max_tokens=64), FleetView.of(workers), NOW)
    assert decision.shape == workers[1].shape != odd
