"""Routing policy: plain values in, decisions out. No servers, no clocks."""

from __future__ import annotations

import random
from typing import Any

import pytest

from router_svc.candidates import Candidate, FleetView, Health, Load, Role, WorkerState, make_candidate
from router_svc.policies import choose, create_policy, policy_names
from router_svc.policy import (
    REASON_LOCAL_REQUIRED,
    REASON_NO_PREFILL,
    REASON_PREFILL_SATURATED,
    REASON_SHORT_PROMPT,
    NoCapacity,
    NoWorker,
    PolicyConfig,
    RouteRequest,
)

NOW = 1000.0
MODEL = "llama-8b"
# For loops of decisions on one unchanging view: the policy's own assignments
# would pile up in it (see test_policy_inflight.py), hiding what is tested.
NO_INFLIGHT = PolicyConfig(inflight_hold_s=0)


def worker(
    worker_id: str,
    role: Role = Role.DECODE,
    gpu: str = "H100-SXM",
    *,
    queued: int = 0,
    active: int = 0,
    kv_used: int = 0,
    kv_total: int = 10_000,
    batch: int = 64,
    hit_rate: float = 0.0,
    age: float | None = 0.1,
    host: str = "",
    model: str = MODEL,
    **routing: object,
) -> Candidate:
    load = None
    if age is not None:
        load = Load(
            queued_prefill_tokens=queued,
            active_requests=active,
            active_sequences=active,
            kv_blocks_used=kv_used,
            kv_blocks_total=kv_total,
            kv_block_size=16,
            max_batch_size=batch,
            prefix_cache_hit_rate=hit_rate,
            received_at=NOW - age,
        )
    return make_candidate(
        worker_id=worker_id,
        role=role,
        model=model,
        endpoint=f"{worker_id}:1",
        load=load,
        node=f"node-{worker_id}",
        host=host or f"host-{worker_id}",
        gpu_type=gpu,
        kv_blocks_total=kv_total,
        kv_block_size=16,
        max_batch_size=batch,
        **routing,  # type: ignore[arg-type]
    )


def req(prompt: int = 4000, max_tokens: int = 128, **kw: object) -> RouteRequest:
    return RouteRequest(model=MODEL, prompt_tokens=prompt, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def view(*candidates: Candidate) -> FleetView:
    return FleetView.of(candidates)


def test_expected_time_sends_a_long_prompt_to_the_busy_h100_where_least_loaded_picks_the_idle_l40s() -> None:
    fleet = view(
        worker("p-h100", Role.PREFILL, "H100-SXM", queued=2000),
        worker("p-l40s", Role.PREFILL, "L40S", queued=0),
        worker("p-a100", Role.PREFILL, "A100-80GB", queued=500),
        worker("d-h200", Role.DECODE, "H200"),
    )
    long_prompt = req(prompt=8000)

    fast = choose(long_prompt, fleet, NOW, policy="expected-time")
    naive = choose(long_prompt, fleet, NOW, policy="least-loaded")

    assert fast.prefill is not None and fast.prefill.worker_id == "p-h100"
    assert fast.reason == "expected-time" and not fast.local_prefill
    assert naive.prefill is not None and naive.prefill.worker_id == "p-l40s"
    # The cost model agrees with the choice: less time to first token on the H100.
    assert fast.estimates.ttft_s < naive.estimates.ttft_s


def test_expected_time_decodes_on_bandwidth_not_on_sequence_count() -> None:
    fleet = view(
        worker("d-h200", Role.DECODE, "H200", active=8, kv_used=1000),
        worker("d-l40s", Role.DECODE, "L40S", active=0),
    )
    fast = choose(req(prompt=100), fleet, NOW, policy="expected-time")
    naive = choose(req(prompt=100), fleet, NOW, policy="least-loaded")
    assert fast.decode.worker_id == "d-h200"
    assert naive.decode.worker_id == "d-l40s"
    assert fast.estimates.inter_token_s < naive.estimates.inter_token_s


def test_gpu_count_scales_the_rate() -> None:
    fleet = view(
        worker("p-one", Role.PREFILL, "A100-80GB", queued=0),
        worker("p-four", Role.PREFILL, "A100-80GB", queued=6000, gpu_count=4),
        worker("d", Role.DECODE),
    )
    decision = choose(req(prompt=8000), fleet, NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p-four"


def test_prefix_cache_hits_make_a_prefill_worker_cheaper() -> None:
    fleet = view(
        worker("p-cold", Role.PREFILL, hit_rate=0.0),
        worker("p-warm", Role.PREFILL, hit_rate=0.6),
        worker("d", Role.DECODE),
    )
    decision = choose(req(prompt=4000), fleet, NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p-warm"
    assert decision.estimates.prefix_hit_tokens == 2400


def test_same_host_prefill_is_preferred_when_all_else_is_equal() -> None:
    fleet = view(
        worker("p-far", Role.PREFILL, host="h1"),
        worker("p-near", Role.PREFILL, host="h2"),
        worker("d", Role.DECODE, host="h2"),
    )
    decision = choose(req(prompt=4000), fleet, NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p-near"


@pytest.mark.parametrize("name", ["expected-time", "least-loaded", "round-robin", "random"])
def test_short_prompt_is_prefilled_on_the_decode_worker(name: str) -> None:
    fleet = view(worker("p", Role.PREFILL), worker("d", Role.DECODE))
    decision = choose(req(prompt=200), fleet, NOW, policy=name)
    assert decision.local_prefill and decision.prefill is None
    assert decision.reason == REASON_SHORT_PROMPT
    assert decision.estimates.kv_transfer_s == 0.0


def test_short_prompt_threshold_is_configurable() -> None:
    fleet = view(worker("p", Role.PREFILL), worker("d", Role.DECODE))
    policy = create_policy("expected-time", config=PolicyConfig(local_prefill_max_prompt_tokens=16))
    assert policy.choose(req(prompt=200), fleet, NOW).prefill is not None
    assert policy.choose(req(prompt=16), fleet, NOW).reason == REASON_SHORT_PROMPT


def test_no_routable_prefill_worker_means_local_prefill() -> None:
    fleet = view(worker("p", Role.PREFILL, state=WorkerState.DRAINING), worker("d", Role.DECODE))
    decision = choose(req(), fleet, NOW)
    assert decision.local_prefill and decision.reason == REASON_NO_PREFILL


def test_saturated_prefill_workers_are_skipped_and_all_saturated_means_local() -> None:
    limit = PolicyConfig().prefill_queue_limit_tokens
    busy_fast = worker("p-h100", Role.PREFILL, "H100-SXM", queued=limit + 1)
    idle_slow = worker("p-l40s", Role.PREFILL, "L40S", queued=0)
    decode = worker("d", Role.DECODE)

    decision = choose(req(), view(busy_fast, idle_slow, decode), NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p-l40s"

    decision = choose(req(), view(busy_fast, decode), NOW)
    assert decision.local_prefill and decision.reason == REASON_PREFILL_SATURATED


def test_local_prefill_can_be_required() -> None:
    fleet = view(worker("p", Role.PREFILL), worker("d", Role.DECODE))
    decision = choose(req(allow_remote_prefill=False), fleet, NOW)
    assert decision.local_prefill and decision.reason == REASON_LOCAL_REQUIRED


def test_local_prefill_weighs_the_decode_workers_compute() -> None:
    # Without a prefill worker, a long prompt runs on the decode worker: the
    # H100's compute outweighs the L40S's empty batch.
    fleet = view(worker("d-h100", Role.DECODE, "H100-SXM", active=4), worker("d-l40s", Role.DECODE, "L40S"))
    decision = choose(req(prompt=8000, max_tokens=16), fleet, NOW)
    assert decision.reason == REASON_NO_PREFILL and decision.decode.worker_id == "d-h100"


@pytest.mark.parametrize("name", ["expected-time", "least-loaded", "round-robin", "random"])
def test_excluded_workers_are_never_chosen(name: str) -> None:
    fleet = view(
        worker("p1", Role.PREFILL), worker("p2", Role.PREFILL, "L40S"),
        worker("d1", Role.DECODE), worker("d2", Role.DECODE, "L40S"),
    )
    policy = create_policy(name, rng=random.Random(3), config=NO_INFLIGHT)
    for _ in range(20):
        decision = policy.choose(req(exclude=frozenset({"p1", "d1"})), fleet, NOW)
        assert decision.decode.worker_id == "d2"
        assert decision.prefill is not None and decision.prefill.worker_id == "p2"


def test_every_decode_worker_excluded_is_unavailable_and_says_why() -> None:
    fleet = view(worker("d1", Role.DECODE), worker("d2", Role.DECODE))
    with pytest.raises(NoWorker) as err:
        choose(req(exclude=frozenset({"d1", "d2"})), fleet, NOW)
    assert "2 already failed this request" in str(err.value)
    assert err.value.model == MODEL


UNROUTABLE: dict[str, dict[str, Any]] = {
    "state-draining": {"state": WorkerState.DRAINING},
    "state-starting": {"state": WorkerState.STARTING},
    "drain-intent": {"drain_requested": True},
    "cordoned": {"node_cordoned": True},
    "not-serving": {"health": Health.NOT_SERVING},
}


@pytest.mark.parametrize("name", ["expected-time", "least-loaded", "round-robin", "random"])
def test_drained_cordoned_and_not_serving_workers_are_never_chosen(name: str) -> None:
    bad = [worker(f"d-bad-{k}", Role.DECODE, "B200", **v) for k, v in UNROUTABLE.items()]
    bad += [worker(f"p-bad-{k}", Role.PREFILL, "B200", **v) for k, v in UNROUTABLE.items()]
    draining_load = Load(draining=True, kv_blocks_total=10_000, kv_block_size=16, received_at=NOW)
    bad.append(make_candidate(worker_id="d-bad-load", role=Role.DECODE, model=MODEL, endpoint="x:1",
                              load=draining_load, gpu_type="B200"))
    good = [worker("d-ok", Role.DECODE, "L4", active=30), worker("p-ok", Role.PREFILL, "L4", queued=9000)]
    fleet = view(*bad, *good)
    policy = create_policy(name, rng=random.Random(7), config=NO_INFLIGHT)
    for _ in range(30):
        decision = policy.choose(req(), fleet, NOW)
        assert decision.decode.worker_id == "d-ok"
        assert decision.prefill is not None and decision.prefill.worker_id == "p-ok"


def test_health_serving_and_unknown_are_both_routable() -> None:
    assert worker("a", health=Health.SERVING).routable
    assert worker("b", health=Health.UNKNOWN).routable
    assert worker("c", health=Health.NOT_SERVING).unroutable == "not-serving"


def test_model_nobody_serves_is_unavailable_naming_it() -> None:
    with pytest.raises(NoWorker, match="no worker serves model 'llama-8b'"):
        choose(req(), view(worker("d", model="other")), NOW)
    with pytest.raises(NoWorker, match="1 prefill workers, none decodes"):
        choose(req(), view(worker("p", Role.PREFILL)), NOW)


def test_all_unroutable_is_unavailable_with_a_tally() -> None:
    fleet = view(worker("d1", state=WorkerState.DRAINING), worker("d2", health=Health.NOT_SERVING))
    with pytest.raises(NoWorker) as err:
        choose(req(), fleet, NOW)
    assert "no routable decode worker for model 'llama-8b'" in str(err.value)
    assert "1 draining" in str(err.value) and "1 not-serving" in str(err.value)


def test_full_workers_mean_no_capacity_with_a_retry_hint() -> None:
    fleet = view(
        worker("d-kv", kv_used=9_990, kv_total=10_000),
        worker("d-batch", active=64, batch=64),
        worker("d-gone", state=WorkerState.DRAINING),
    )
    policy = create_policy(config=PolicyConfig(retry_after_s=2.5))
    with pytest.raises(NoCapacity) as err:
        policy.choose(req(prompt=4000), fleet, NOW)
    assert err.value.retry_after_s == 2.5
    message = str(err.value)
    assert "busy" in message and "1 batch full" in message and "free KV blocks" in message
    assert "retry after 2.5s" in message


def test_a_worker_without_room_for_prompt_and_output_is_skipped() -> None:
    # The B200 is fastest but has 200 free blocks; 4000 + 128 tokens need 258.
    fleet = view(worker("d-b200", gpu="B200", kv_used=9_800), worker("d-l4", gpu="L4"))
    assert choose(req(prompt=4000), fleet, NOW).decode.worker_id == "d-l4"
    assert choose(req(prompt=3000), fleet, NOW).decode.worker_id == "d-b200"


def test_a_worker_with_too_short_a_context_is_skipped() -> None:
    fleet = view(worker("d-short", gpu="B200", max_context_tokens=2048), worker("d-long", gpu="L4"))
    assert choose(req(prompt=4000), fleet, NOW).decode.worker_id == "d-long"
    with pytest.raises(NoWorker, match="context under 4128 tokens"):
        choose(req(prompt=4000), view(worker("d-short", max_context_tokens=2048)), NOW)


def test_pinned_decode_worker_is_kept_while_eligible() -> None:
    fleet = view(worker("d-fast", gpu="B200"), worker("d-slow", gpu="L4"), worker("p", Role.PREFILL))
    kept = choose(req(decode_worker_id="d-slow", exclude=frozenset({"p-failed"})), fleet, NOW)
    assert kept.decode.worker_id == "d-slow"
    moved = choose(req(decode_worker_id="d-slow", exclude=frozenset({"d-slow"})), fleet, NOW)
    assert moved.decode.worker_id == "d-fast"


def test_stale_load_is_penalised_against_fresh_load() -> None:
    fleet = view(worker("d-a", age=60.0), worker("d-b", age=0.5), worker("d-c", age=None))
    assert choose(req(prompt=100), fleet, NOW).decode.worker_id == "d-b"


def test_unified_workers_decode_but_do_not_prefill_for_others() -> None:
    fleet = view(worker("u", Role.UNIFIED), worker("p", Role.PREFILL))
    decision = choose(req(), fleet, NOW)
    assert decision.decode.worker_id == "u"
    assert decision.prefill is not None and decision.prefill.worker_id == "p"
    assert fleet.routable_counts(MODEL) == (1, 1)


def test_round_robin_is_deterministic_whatever_the_view_order() -> None:
    ids = ["d3", "d1", "d2"]
    forward = view(*(worker(i) for i in ids))
    backward = view(*(worker(i) for i in reversed(ids)))
    a, b = create_policy("round-robin"), create_policy("round-robin")
    seq_a = [a.choose(req(prompt=10), forward, NOW).decode.worker_id for _ in range(6)]
    seq_b = [b.choose(req(prompt=10), backward, NOW).decode.worker_id for _ in range(6)]
    assert seq_a == seq_b == ["d1", "d2", "d3", "d1", "d2", "d3"]


def test_round_robin_turns_are_per_model() -> None:
    fleet = view(worker("a1"), worker("a2"), worker("b1", model="other"), worker("b2", model="other"))
    policy = create_policy("round-robin")
    picks = []
    for model in [MODEL, "other", MODEL, "other"]:
        request = RouteRequest(model=model, prompt_tokens=10, max_tokens=10)
        picks.append(policy.choose(request, fleet, NOW).decode.worker_id)
    assert picks == ["a1", "b1", "a2", "b2"]


def test_random_is_reproducible_with_a_seed_and_spreads_load() -> None:
    fleet = view(*(worker(f"d{i}") for i in range(5)), *(worker(f"p{i}", Role.PREFILL) for i in range(5)))

    def run(seed: int) -> list[tuple[str, str | None]]:
        policy = create_policy("random", rng=random.Random(seed))
        out = []
        for _ in range(50):
            d = policy.choose(req(), fleet, NOW)
            out.append((d.decode.worker_id, d.prefill.worker_id if d.prefill else None))
        return out

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert len({d for d, _ in run(42)}) == 5


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'; known: expected-time"):
        create_policy("fastest")
    assert policy_names() == ["expected-time", "expected-time-prefix-blind", "least-loaded", "random", "round-robin"]


def test_unknown_gpu_type_is_treated_as_a_modest_gpu() -> None:
    fleet = view(worker("p-unknown", Role.PREFILL, gpu=""), worker("p-h100", Role.PREFILL, "H100-SXM"),
                 worker("d", Role.DECODE, gpu="mystery-9000"))
    decision = choose(req(), fleet, NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p-h100"
    assert decision.estimates.inter_token_s > 0


def _thousand_workers() -> list[Candidate]:
    rng = random.Random(1)
    gpus = ["H100-SXM", "H200", "A100-80GB", "L40S", "L4", "B200"]
    candidates = []
    for i in range(500):
        candidates.append(worker(f"p{i:04}", Role.PREFILL, rng.choice(gpus), queued=rng.randrange(0, 60_000)))
        candidates.append(worker(f"d{i:04}", Role.DECODE, rng.choice(gpus), active=rng.randrange(0, 64),
                                 kv_used=rng.randrange(0, 10_000)))
    return candidates


def test_a_thousand_candidates_visited_all_pick_the_cost_model_minimum() -> None:
    candidates = _thousand_workers()
    policy = create_policy("expected-time", config=PolicyConfig(sample_size=0))
    request = req(prompt=6000, max_tokens=256)
    decision = policy.choose(request, view(*candidates), NOW)

    shape = policy.config.default_shape
    decoders = [c for c in candidates if c.role is Role.DECODE and c.free_blocks >= 391 and c.load
                and c.load.active_sequences < 64]
    best_decode = min(decoders, key=lambda c: policy.decode_cost_s(c, request, shape))
    assert decision.decode.worker_id == best_decode.worker_id
    assert decision.prefill is not None
    best_prefill_cost = min(policy.prefill_cost_s(c, request, shape) for c in candidates
                            if c.role is Role.PREFILL and c.load and c.load.queued_prefill_tokens <= 65536)
    assert policy.prefill_cost_s(decision.prefill, request, shape) <= best_prefill_cost + 0.05


def test_a_thousand_candidates_sampled_pick_near_the_minimum() -> None:
    """The default visits 8 workers per role: its picks land near the best, not at random."""
    candidates = _thousand_workers()
    fleet = view(*candidates)
    policy = create_policy("expected-time", config=NO_INFLIGHT)
    request = req(prompt=6000, max_tokens=256)
    shape = policy.config.default_shape
    decoders = [c for c in candidates if c.role is Role.DECODE and c.free_blocks >= 391 and c.load
                and c.load.active_sequences < 64]
    costs = sorted(policy.decode_cost_s(c, request, shape) for c in decoders)
    ranks = []
    for _ in range(200):
        chosen = policy.choose(request, fleet, NOW).decode
        ranks.append(sum(cost < policy.decode_cost_s(chosen, request, shape) for cost in costs) / len(costs))
    # The best of 8 random draws ranks at 1/9 (11%) of the field on average; a uniform pick at 50%.
    assert sum(ranks) / len(ranks) < 0.2


@pytest.mark.parametrize("name", ["expected-time", "least-loaded", "round-robin", "random"])
def test_the_one_eligible_worker_of_a_large_fleet_is_found_beyond_the_sample(name: str) -> None:
    """Sampling must never turn "one worker has room" into "every worker is busy"."""
    full = [worker(f"d{i:03}", batch=8, active=8) for i in range(300)]
    fleet = view(*full, worker("d150-free", batch=8, active=0))
    policy = create_policy(name, config=NO_INFLIGHT)
    for _ in range(5):
        assert policy.choose(req(prompt=100), fleet, NOW).decode.worker_id == "d150-free"


@pytest.mark.parametrize("name", ["expected-time", "least-loaded", "round-robin", "random"])
def test_a_large_fleet_all_full_is_no_capacity_with_every_worker_counted(name: str) -> None:
    fleet = view(*[worker(f"d{i:03}", batch=8, active=8) for i in range(300)])
    with pytest.raises(NoCapacity, match="300 batch full"):
        create_policy(name, config=NO_INFLIGHT).choose(req(prompt=100), fleet, NOW)


def test_round_robin_over_a_large_fleet_visits_every_worker_once_per_turn() -> None:
    fleet = view(*[worker(f"d{i:03}") for i in range(100)], *[worker(f"p{i:03}", Role.PREFILL) for i in range(40)])
    policy = create_policy("round-robin", config=NO_INFLIGHT)
    decisions = [policy.choose(req(), fleet, NOW) for _ in range(200)]
    decodes = [d.decode.worker_id for d in decisions]
    assert decodes[:100] == [f"d{i:03}" for i in range(100)] and decodes[100:] == decodes[:100]
    prefills = [d.prefill.worker_id for d in decisions if d.prefill is not None]
    assert prefills[:80] == [f"p{i:03}" for i in range(40)] * 2


def test_round_robin_skips_a_busy_worker_and_keeps_its_place_on_the_ring() -> None:
    busy = worker("d003", batch=8, active=8)
    fleet = view(*[worker(f"d{i:03}") for i in range(6) if i != 3], busy)
    policy = create_policy("round-robin", config=NO_INFLIGHT)
    picks = [policy.choose(req(prompt=100), fleet, NOW).decode.worker_id for _ in range(6)]
    assert picks == ["d000", "d001", "d002", "d004", "d005", "d000"]
