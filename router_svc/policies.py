"""Routing policies by name: what `--policy` selects. Pure."""

from __future__ import annotations

import random
from collections.abc import Callable

from router_svc.baseline_policies import LeastLoadedPolicy, RandomPolicy, RoundRobinPolicy
from router_svc.candidates import FleetView
from router_svc.costmodel import CostModel
from router_svc.policy import (
    Decision,
    ExpectedTimePolicy,
    Policy,
    PolicyConfig,
    PrefixBlindExpectedTimePolicy,
    RouteRequest,
)

_POLICIES: dict[str, Callable[..., Policy]] = {
    cls.name: cls for cls in (ExpectedTimePolicy, PrefixBlindExpectedTimePolicy, LeastLoadedPolicy, RoundRobinPolicy,
                              RandomPolicy)
}
DEFAULT_POLICY = ExpectedTimePolicy.name


def register_policy(name: str, factory: Callable[..., Policy]) -> None:
    """Make a policy selectable by `name` (plugins, experiments)."""
    _POLICIES[name] = factory


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def create_policy(
    name: str = DEFAULT_POLICY,
    *,
    cost: CostModel | None = None,
    config: PolicyConfig | None = None,
    rng: random.Random | None = None,
) -> Policy:
    """A new policy of the registered kind `name`; ValueError names the known ones."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(policy_names())}") from None
    return factory(cost=cost, config=config, rng=rng)


def choose(request: RouteRequest, view: FleetView, now: float, *, policy: Policy | str = DEFAULT_POLICY) -> Decision:
    """One decision. Pass a Policy object (not a name) to keep round-robin's turn across calls."""
    chosen = create_policy(policy) if isinstance(policy, str) else policy
    return chosen.choose(request, view, now)
