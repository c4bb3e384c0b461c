"""A burst decided between two load reports: the policy counts what it just sent, and breaks ties fairly."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from router_svc.candidates import Candidate, FleetView, Load, Role, make_candidate
from router_svc.inflight import Assignment, InflightLedger
from router_svc.policies import create_policy
from router_svc.policy import RouteRequest

NOW = 50.0
MODEL = "m"


def worker(worker_id: str, role: Role = Role.DECODE, gpu: str = "H100-SXM", *, seen_at: float = NOW - 0.03,
           active: int = 0) -> Candidate:
    load = Load(active_requests=active, active_sequences=active, kv_blocks_total=10_000, kv_block_size=16,
                max_batch_size=64, received_at=seen_at)
    return make_candidate(worker_id=worker_id, role=role, model=MODEL, endpoint=f"{worker_id}:1", load=load,
                          host=f"host-{worker_id}", gpu_type=gpu, kv_blocks_total=10_000, kv_block_size=16,
                          max_batch_size=64)


def burst(policy_name: str, view: FleetView, n: int, *, prompt: int = 20, seed: int = 0) -> Counter[str]:
    """`n` decisions at one instant, on one view: no load report comes between them."""
    policy = create_policy(policy_name, rng=random.Random(seed))
    request = RouteRequest(model=MODEL, prompt_tokens=prompt, max_tokens=64)
    return Counter(policy.choose(request, view, NOW).decode.worker_id for _ in range(n))


@pytest.mark.parametrize("name", ["expected-time", "least-loaded"])
def test_a_burst_over_identical_workers_spreads_evenly(name: str) -> None:
    for n_workers, streams in ((2, 24), (3, 30), (5, 12)):
        view = FleetView.of(worker(f"d{i}") for i in range(n_workers))
        spread = burst(name, view, streams)
        assert sorted(spread) == [f"d{i}" for i in range(n_workers)]
        assert max(spread.values()) - min(spread.values()) <= 1, spread


def test_the_burst_counts_prefill_queues_too() -> None:
    view = FleetView.of([worker("d0"), worker("p0", Role.PREFILL), worker("p1", Role.PREFILL)])
    policy = create_policy("expected-time")
    request = RouteRequest(model=MODEL, prompt_tokens=4000, max_tokens=64)
    picks = Counter(policy.choose(request, view, NOW).prefill.worker_id for _ in range(10))  # type: ignore[union-attr]
    assert picks == {"p0": 5, "p1": 5}


def test_ties_are_drawn_by_the_seeded_rng_not_by_worker_id() -> None:
    view = FleetView.of(worker(f"d{i}") for i in range(4))
    request = RouteRequest(model=MODEL, prompt_tokens=20, max_tokens=64)

    def first_choices(seed: int) -> list[str]:
        # A fresh policy per decision: every one sees four equal, idle workers.
        return [create_policy("expected-time", rng=random.Random(seed * 1000 + i)).choose(request, view, NOW)
                .decode.worker_id for i in range(40)]

    assert set(first_choices(1)) == {"d0", "d1", "d2", "d3"}
    assert first_choices(1) == first_choices(1), "seeded: reproducible"


def test_an_assignment_counts_until_a_report_can_show_it() -> None:
    ledger = InflightLedger(reflect_s=0.1, hold_s=2.0)
    ledger.add("d0", Assignment(NOW, queued_tokens=20, kv_tokens=52, sequences=1))
    before = worker("d0", seen_at=NOW - 0.03)
    counted = ledger.apply(before, NOW)
    assert counted.load is not None and counted.load.active_sequences == 1
    assert counted.load.queued_prefill_tokens == 20 and counted.load.kv_blocks_used == 4
    # A report received 50 ms after the decision may predate the worker's next look at its load...
    assert ledger.apply(worker("d0", seen_at=NOW + 0.05), NOW + 0.05).load.active_sequences == 1  # type: ignore[union-attr]
    # ...one received 100 ms after shows it: counting it again would count it twice.
    shown = worker("d0", seen_at=NOW + 0.1, active=1)
    assert ledger.apply(shown, NOW + 0.1) is shown
    assert len(ledger) == 0


def test_an_assignment_no_report_shows_is_forgotten_after_the_hold() -> None:
    ledger = InflightLedger(reflect_s=0.1, hold_s=2.0)
    ledger.add("d0", Assignment(NOW, sequences=1))
    ledger.add("gone", Assignment(NOW, sequences=1))
    silent = worker("d0", seen_at=NOW - 1)
    assert ledger.apply(silent, NOW + 1.9) is not silent
    assert ledger.apply(silent, NOW + 2.0) is silent
    assert len(ledger) == 1, "only the worker looked at is pruned at once"
    ledger.apply(silent, NOW + 4.0)
    assert len(ledger) == 0, "a worker no decision looks at any more is swept once a hold has passed"


def test_a_worker_without_a_report_yet_keeps_its_stale_penalty() -> None:
    ledger = InflightLedger(reflect_s=0.1, hold_s=2.0)
    ledger.add("d0", Assignment(NOW, sequences=1))
    fresh = make_candidate(worker_id="d0", role=Role.DECODE, model=MODEL, endpoint="d0:1")
    counted = ledger.apply(fresh, NOW)
    assert counted.load is not None and counted.load.active_sequences == 1
    assert counted.load_age(NOW) == math.inf


def test_a_remote_prefills_decode_worker_counts_from_when_the_kv_arrives() -> None:
    view = FleetView.of([worker("d0"), worker("p0", Role.PREFILL)])
    policy = create_policy("expected-time")
    decision = policy.choose(RouteRequest(model=MODEL, prompt_tokens=8000, max_tokens=64), view, NOW)
    lead = decision.estimates.ttft_s + decision.estimates.kv_transfer_s
    assert lead > 0.1
    # A report after reflect_s but before the prefill can have finished does not show the decode yet.
    early = worker("d0", seen_at=NOW + 0.1)
    assert policy.inflight.apply(early, NOW + 0.1).load.active_sequences == 1  # type: ignore[union-attr]
    late = worker("d0", seen_at=NOW + lead + 0.1, active=1)
    assert policy.inflight.apply(late, NOW + lead + 0.1) is late


def test_retrying_only_the_prefill_does_not_count_the_decode_twice() -> None:
    view = FleetView.of([worker("d0"), worker("p0", Role.PREFILL), worker("p1", Role.PREFILL)])
    policy = create_policy("expected-time")
    request = RouteRequest(model=MODEL, prompt_tokens=4000, max_tokens=64)
    first = policy.choose(request, view, NOW)
    assert first.prefill is not None
    retry = RouteRequest(model=MODEL, prompt_tokens=4000, max_tokens=64, decode_worker_id="d0",
                         exclude=frozenset({first.prefill.worker_id}))
    policy.choose(retry, view, NOW)
    assert policy.inflight.apply(worker("d0"), NOW).load.active_sequences == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["expected-time", "least-loaded", "round-robin", "random"])
def test_the_ledger_spreads_work_but_never_makes_a_worker_with_room_full(name: str) -> None:
    """A saturated router once waited a second per request: its own estimates said "batch full" long after
    the work they counted had finished. Only the workers' reports may say a worker is full."""
    view = FleetView.of([worker("d0"), worker("d1")])  # each reports 0 of 64 sequences
    policy = create_policy(name)
    request = RouteRequest(model=MODEL, prompt_tokens=20, max_tokens=64)
    picks = Counter(policy.choose(request, view, NOW).decode.worker_id for _ in range(300))
    assert sum(picks.values()) == 300  # far past 2 x 64 by the ledger's count: never NoCapacity
    assert max(picks.values()) - min(picks.values()) <= 1 or name == "random"


def test_a_worker_its_report_calls_full_is_still_no_capacity() -> None:
    from router_svc.policy import NoCapacity

    view = FleetView.of([worker("d0", active=64)])
    with pytest.raises(NoCapacity, match="1 batch full"):
        create_policy("expected-time").choose(RouteRequest(model=MODEL, prompt_tokens=20, max_tokens=64), view, NOW)
