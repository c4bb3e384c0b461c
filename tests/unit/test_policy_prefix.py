"""Prefix-aware routing with plain values: uncached work, load against cache, sampling, local vs remote."""

from __future__ import annotations

import random

from router_svc.candidates import Role
from router_svc.policy import (
    REASON_PREFIX_CACHED,
    ExpectedTimePolicy,
    PolicyConfig,
    PrefixBlindExpectedTimePolicy,
)
from router_svc.prefix_index import CachedPrefix
from tests.unit.test_policy import NO_INFLIGHT, NOW, req, view, worker

PREFILLERS = [worker(f"p{i}", Role.PREFILL) for i in range(4)]
DECODERS = [worker(f"d{i}", Role.DECODE) for i in range(2)]


def test_the_prefill_worker_holding_the_prefix_wins_and_only_the_rest_is_priced() -> None:
    cached = CachedPrefix.of(prefill={"p2": 3900})
    policy = ExpectedTimePolicy(config=NO_INFLIGHT)
    decision = policy.choose(req(prompt=4000, cached=cached), view(*PREFILLERS, *DECODERS), NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p2"
    assert decision.estimates.prefix_hit_tokens == 3900
    blind = PrefixBlindExpectedTimePolicy(config=NO_INFLIGHT).choose(req(prompt=4000), view(*PREFILLERS, *DECODERS),
                                                                     NOW)
    # 100 uncached tokens cost 1/40 of the whole prompt's prefill.
    assert 39 < blind.estimates.prefill_s / decision.estimates.prefill_s < 41


def test_a_hot_holder_is_not_flooded_once_its_queue_costs_more_than_the_prefix_saves() -> None:
    cached = CachedPrefix.of(prefill={"p0": 3000})
    busy = [worker("p0", Role.PREFILL, queued=3500), *PREFILLERS[1:]]
    decision = ExpectedTimePolicy(config=NO_INFLIGHT).choose(req(prompt=4000, cached=cached), view(*busy, *DECODERS),
                                                             NOW)
    assert decision.prefill is not None and decision.prefill.worker_id != "p0"  # 3500 queued + 1000 > 4000
    decision = ExpectedTimePolicy(config=NO_INFLIGHT).choose(
        req(prompt=4000, cached=cached), view(worker("p0", Role.PREFILL, queued=2500), *PREFILLERS[1:], *DECODERS), NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p0"  # 2500 + 1000 < 4000
    # With its own decisions counted in flight, a burst of one prefix spreads once the holder's queue grows.
    policy = ExpectedTimePolicy(rng=random.Random(1))
    fleet = view(*PREFILLERS, *DECODERS)
    chosen = [policy.choose(req(prompt=4000, cached=cached), fleet, NOW).prefill for _ in range(6)]
    names = [c.worker_id for c in chosen if c is not None]
    assert names[0] == "p0" and len(set(names)) > 1 and names.count("p0") >= 2


def test_the_lifetime_hit_rate_is_not_counted_on_top_of_the_index() -> None:
    # p1 has a high lifetime hit rate but holds nothing of this prompt; p0 holds half of it.
    fleet = view(worker("p0", Role.PREFILL), worker("p1", Role.PREFILL, hit_rate=0.9), *DECODERS)
    cached = CachedPrefix.of(prefill={"p0": 2000})
    aware = ExpectedTimePolicy(config=NO_INFLIGHT).choose(req(prompt=4000, cached=cached), fleet, NOW)
    blind = PrefixBlindExpectedTimePolicy(config=NO_INFLIGHT).choose(req(prompt=4000, cached=cached), fleet, NOW)
    assert aware.prefill is not None and aware.prefill.worker_id == "p0"
    assert blind.prefill is not None and blind.prefill.worker_id == "p1"


def test_sampling_never_hides_the_workers_holding_the_prefix() -> None:
    fleet = view(*[worker(f"p{i:03}", Role.PREFILL) for i in range(200)], *DECODERS)
    cached = CachedPrefix.of(prefill={"p137": 3800, "p012": 1000})
    config = PolicyConfig(inflight_hold_s=0, sample_size=4)
    policy = ExpectedTimePolicy(config=config, rng=random.Random(3))
    for _ in range(20):
        decision = policy.choose(req(prompt=4000, cached=cached), fleet, NOW)
        assert decision.prefill is not None and decision.prefill.worker_id == "p137"
    # Holders that are not routable, or already failed the request, are not added.
    decision = policy.choose(req(prompt=4000, cached=cached, exclude=frozenset({"p137"})), fleet, NOW)
    assert decision.prefill is not None and decision.prefill.worker_id == "p012"
    off = ExpectedTimePolicy(config=PolicyConfig(inflight_hold_s=0, sample_size=4, prefix_holders=0),
                             rng=random.Random(3))
    hits = sum(off.choose(req(prompt=4000, cached=cached), fleet, NOW).prefill.worker_id == "p137"  # type: ignore[union-attr]
               for _ in range(20))
    assert hits < 20


def test_a_long_prompt_mostly_cached_on_a_decode_worker_is_prefilled_there() -> None:
    fleet = view(*PREFILLERS, *DECODERS)
    cached = CachedPrefix.of(decode={"d1": 3900})
    decision = ExpectedTimePolicy(config=NO_INFLIGHT).choose(req(prompt=4000, cached=cached), fleet, NOW)
    assert decision.local_prefill and decision.reason == REASON_PREFIX_CACHED and decision.decode.worker_id == "d1"
    # Too much left to compute: disaggregated as before.
    cached = CachedPrefix.of(decode={"d1": 3000})
    decision = ExpectedTimePolicy(config=NO_INFLIGHT).choose(req(prompt=4000, cached=cached), fleet, NOW)
    assert not decision.local_prefill
    # A full holder is not eligible: the prompt goes elsewhere, disaggregated.
    full = view(*PREFILLERS, worker("d0", Role.DECODE), worker("d1", Role.DECODE, active=64))
    decision = ExpectedTimePolicy(config=NO_INFLIGHT).choose(
        req(prompt=4000, cached=CachedPrefix.of(decode={"d1": 3900})), full, NOW)
    assert decision.decode.worker_id == "d0" and not decision.local_prefill


def test_local_prefill_prices_the_uncached_rest_on_each_decode_worker() -> None:
    fleet = view(*DECODERS)  # no prefill worker: local
    cached = CachedPrefix.of(decode={"d0": 2000})
    decision = ExpectedTimePolicy(config=NO_INFLIGHT).choose(req(prompt=4000, cached=cached), fleet, NOW)
    assert decision.local_prefill and decision.decode.worker_id == "d0"


def test_baseline_policies_ignore_the_index() -> None:
    for cls in (PrefixBlindExpectedTimePolicy,):
        assert not cls.uses_prefix_cache
    assert ExpectedTimePolicy.uses_prefix_cache
