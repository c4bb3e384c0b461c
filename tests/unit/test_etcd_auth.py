"""The etcd permission plan, as plain values: which component may read or write which registry key."""

from __future__ import annotations

import pytest

from registry.etcd_auth import (
    CONTROLPLANE_USER,
    ROUTER_USER,
    RolePlan,
    WorkerIdentity,
    agent_role,
    agent_user,
    allowed,
    controlplane_role,
    permission_plan,
    router_role,
    worker_role,
    worker_user,
)
from registry.keys import Keys

KEYS = Keys()


def every_key() -> list[str]:
    return [KEYS.worker("d0"), KEYS.worker("d1"), KEYS.worker("d01"), KEYS.node("n1"), KEYS.node("n2"),
            KEYS.gpu_claim("GPU-a"), KEYS.gpu_claim("GPU-b"), KEYS.health("d0"), KEYS.drain("d0"), KEYS.cordon("n1"),
            KEYS.model("m"), KEYS.election(7), KEYS.role("d0"), KEYS.plan("m"), KEYS.demand("r1")]


def writable(role: RolePlan) -> set[str]:
    return {key for key in every_key() if allowed(role, key, write=True)}


def test_a_worker_writes_its_own_record_and_gpu_claims_only() -> None:
    role = worker_role(KEYS, WorkerIdentity("d0", "n1", ("GPU-a",)))
    assert writable(role) == {KEYS.worker("d0"), KEYS.gpu_claim("GPU-a")}
    # An exact-key grant: "d0" does not cover "d01" the way a prefix would.
    assert not allowed(role, KEYS.worker("d01"), write=True)
    assert all(allowed(role, key, write=False) for key in every_key()), "workers read the registry"


def test_a_worker_whose_gpus_are_unknown_may_claim_any_gpu_and_one_without_gpus_none() -> None:
    anywhere = worker_role(KEYS, WorkerIdentity("d0", "n1", None))
    assert writable(anywhere) == {KEYS.worker("d0"), KEYS.gpu_claim("GPU-a"), KEYS.gpu_claim("GPU-b")}
    assert writable(worker_role(KEYS, WorkerIdentity("d0", "n1", ()))) == {KEYS.worker("d0")}


def test_an_agent_writes_its_node_only() -> None:
    assert writable(agent_role(KEYS, "n1")) == {KEYS.node("n1")}


def test_the_control_plane_writes_verdicts_intents_models_and_its_election_but_no_record() -> None:
    assert writable(controlplane_role(KEYS)) == {KEYS.health("d0"), KEYS.drain("d0"), KEYS.cordon("n1"),
                                                 KEYS.model("m"), KEYS.election(7), KEYS.role("d0"), KEYS.plan("m")}


def test_the_router_writes_only_demand_reports() -> None:
    role = router_role(KEYS)
    assert writable(role) == {KEYS.demand("r1")}
    assert all(allowed(role, key, write=False) for key in every_key())


def test_nothing_outside_the_prefix_is_granted() -> None:
    for role in permission_plan(KEYS, [WorkerIdentity("d0", "n1", None)], ["n1"]):
        assert not allowed(role, "/other/v1/workers/d0", write=False)
        assert not allowed(role, "/tandemx/v1/workers/d0", write=False), "the prefix ends with '/'"


def test_the_plan_has_one_user_per_component() -> None:
    plan = permission_plan(KEYS, [WorkerIdentity("d0", "n1"), WorkerIdentity("d1", "n1")], ["n1", "n1", "n2"])
    assert [r.user for r in plan] == [CONTROLPLANE_USER, ROUTER_USER, "agent:n1", "agent:n2", "worker:d0",
                                      "worker:d1"]
    assert all(r.role == r.user for r in plan)


@pytest.mark.parametrize("name", ["x" * 128, "Decode_0:a.b"])
def test_user_names_fit_a_certificate_common_name(name: str) -> None:
    assert len(worker_user(name)) <= 64 and len(agent_user(name)) <= 64


def test_user_names_do_not_collide_on_case() -> None:
    assert worker_user("Decode") != worker_user("decode")
