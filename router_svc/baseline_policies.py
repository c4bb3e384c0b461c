"""Baseline routing policies, blind to GPU type: least-loaded, round-robin, random. Pure.

They share the frame of router_svc.policy.Policy (eligibility, when to
prefill locally, in-flight accounting) and differ only in how they pick among
eligible workers. They exist to compare the expected-time policy against.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence

from router_svc.candidates import Candidate
from router_svc.costmodel import CostModel, ModelShape
from router_svc.policy import Policy, PolicyConfig, RouteRequest


def _least_by(rng: random.Random, pool: Sequence[Candidate], key: Callable[[Candidate], tuple[float, ...]]
              ) -> Candidate:
    """The candidate with the lowest key; one drawn by `rng` among equal keys."""
    keys = [key(c) for c in pool]
    best = min(keys)
    ties = [c for c, k in zip(pool, keys, strict=True) if k == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def _utilisation(c: Candidate) -> float:
    load = c.load
    if load is None:
        return 0.0
    kv = load.kv_blocks_used / c.blocks_total if c.blocks_total else 0.0
    batch = load.active_sequences / c.batch_limit if c.batch_limit else 0.0
    return max(kv, batch)


class LeastLoadedPolicy(Policy):
    """Fewest queued prompt tokens (prefill) and lowest KV/batch utilisation (decode); blind to GPU type."""

    name = "least-loaded"

    def pick_decode(
        self, pool: Sequence[Candidate], request: RouteRequest, shape: ModelShape, now: float, *, local: bool
    ) -> Candidate:
        return _least_by(self.rng, pool, lambda c: (_utilisation(c), c.load.active_sequences if c.load else 0))

    def pick_prefill(
        self, pool: Sequence[Candidate], decode: Candidate, request: RouteRequest, shape: ModelShape, now: float
    ) -> Candidate:
        return _least_by(self.rng, pool,
                         lambda c: (c.load.queued_prefill_tokens, c.load.active_requests) if c.load else (0, 0))


class RoundRobinPolicy(Policy):
    """Each model's eligible workers in turn, in worker_id order. Deterministic; not for concurrent use.

    The turn is the last worker picked per (model, role): the next decision
    visits the workers after it on the worker_id ring, so a worker that joins
    or leaves does not reshuffle the order.
    """

    name = "round-robin"

    def __init__(
        self,
        *,
        cost: CostModel | None = None,
        config: PolicyConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(cost=cost, config=config, rng=rng)
        self.last: dict[tuple[str, str], str] = {}

    def visit_order(self, members: Sequence[Candidate], role: str, request: RouteRequest,
                    limit: int | None) -> Sequence[Candidate]:
        start = bisect.bisect_right(members, self.last.get((request.model, role), ""), key=lambda c: c.worker_id)
        count = len(members) if limit is None else min(limit, len(members))
        end = start + count
        return [*members[start:end], *members[:max(0, end - len(members))]]

    def _take(self, pool: Sequence[Candidate], request: RouteRequest, role: str) -> Candidate:
        chosen = pool[0]
        self.last[(request.model, role)] = chosen.worker_id
        return chosen

    def pick_decode(
        self, pool: Sequence[Candidate], request: RouteRequest, shape: ModelShape, now: float, *, local: bool
    ) -> Candidate:
        return self._take(pool, request, "decode")

    def pick_prefill(
        self, pool: Sequence[Candidate], decode: Candidate, request: RouteRequest, shape: ModelShape, now: float
    ) -> Candidate:
        return self._take(pool, request, "prefill")


class RandomPolicy(Policy):
    """Uniform choice with the injected rng (seed it for reproducible runs)."""

    name = "random"

    def pick_decode(
        self, pool: Sequence[Candidate], request: RouteRequest, shape: ModelShape, now: float, *, local: bool
    ) -> Candidate:
        return self.rng.choice(pool)

    def pick_prefill(
        self, pool: Sequence[Candidate], decode: Candidate, request: RouteRequest, shape: ModelShape, now: float
    ) -> Candidate:
        return self.rng.choice(pool)
