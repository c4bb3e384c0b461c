"""Live role switches without servers: the decision table, the role gate, and a decode stream handed over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest

from engine.base import DecodeStep
from tandem.v1 import common_pb2
from worker.admission import Refused
from worker.coalesce import coalesced
from worker.role_gate import RoleGate
from worker.role_switch import Decision, Role, Step, decide, switchable_roles

P, D, U = common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE, common_pb2.ROLE_UNIFIED
BOTH = (P, D)


@pytest.mark.parametrize(("current", "switching_to", "wanted", "switchable", "draining", "expected"), [
    # No intent, or the role it has: nothing (removing an intent never switches back).
    (P, None, None, BOTH, False, Decision(Step.NOTHING, P)),
    (D, None, D, BOTH, False, Decision(Step.NOTHING, D)),
    # Another role it can take: switch.
    (P, None, D, BOTH, False, Decision(Step.START, D)),
    (D, None, P, BOTH, False, Decision(Step.START, P)),
    # A drain wins: the intent waits until the worker is undrained.
    (P, None, D, BOTH, True, Decision(Step.NOTHING, P)),
    # During a switch: the same target goes on; the other role retargets (back to where it came from).
    (P, D, D, BOTH, False, Decision(Step.NOTHING, D)),
    (P, D, P, BOTH, False, Decision(Step.RETARGET, P)),
    # Intent removed during a switch: the switch completes.
    (P, D, None, BOTH, False, Decision(Step.NOTHING, P)),
])
def test_decisions(current: Role, switching_to: Role | None, wanted: Role | None, switchable: tuple[Role, ...],
                   draining: bool, expected: Decision) -> None:
    assert decide(current=current, switching_to=switching_to, wanted=wanted, switchable=switchable,
                  draining=draining) == expected


def test_refusals_keep_the_role_and_say_why() -> None:
    unified = decide(current=P, switching_to=None, wanted=U, switchable=BOTH, draining=False)
    assert unified.step is Step.REFUSE and unified.role == P
    assert unified.reason == "a role intent must name prefill or decode, not unified"
    fixed = decide(current=P, switching_to=None, wanted=D, switchable=(), draining=False)
    assert fixed.step is Step.REFUSE and fixed.role == P
    assert fixed.reason == "this worker cannot serve decode without a restart (switchable roles: only prefill)"


def test_switchable_roles_follow_the_engine() -> None:
    assert switchable_roles(True) == [P, D]
    assert switchable_roles(False) == []


def refusal(gate: RoleGate, role: Role) -> Refused:
    with pytest.raises(Refused) as info:
        gate.check(role)
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    return info.value


async def test_the_gate_takes_only_the_current_role_and_none_while_switching() -> None:
    gate = RoleGate("w-1", P)
    gate.check(P)
    assert refusal(gate, D).message == "worker w-1 serves prefill now, not decode; retry on a decode worker"
    with gate.serving(P):
        assert gate.in_flight(P) == 1
        gate.close(D)
        assert refusal(gate, D).message == ("worker w-1 is switching to decode and takes no new decode requests; "
                                            "retry on another worker")
        refusal(gate, P)
        assert not await gate.wait_idle(P, timeout=0.01)
    assert await gate.wait_idle(P, timeout=0.01) and gate.in_flight(P) == 0
    gate.open()
    gate.check(D)
    refusal(gate, P)


async def test_hand_over_fails_only_the_open_streams_of_that_role() -> None:
    gate = RoleGate("w-1", D)
    with gate.serving(D) as stream:
        assert gate.hand_over(P, "nothing of prefill runs") == 0
        assert gate.hand_over(D, "handed over: worker w-1 switching to prefill") == 1
        assert isinstance(stream.exception(), Refused)
        assert gate.hand_over(D, "again") == 0, "a stream is handed over once"
    with gate.serving(D) as later:
        pass
    assert later.cancelled(), "a finished stream's future is settled, never failed"


async def slow_steps(tokens: int, first: asyncio.Event) -> AsyncGenerator[DecodeStep, None]:
    for token in range(tokens):
        yield DecodeStep([token])
        first.set()
        await asyncio.sleep(0.01)
    yield DecodeStep([], finish_reason="length")


async def test_a_handed_over_stream_ends_with_the_refusal_after_the_tokens_it_sent() -> None:
    gate = RoleGate("w-1", D)
    first = asyncio.Event()
    sent: list[int] = []
    with gate.serving(D) as handover:
        stream = coalesced(slow_steps(10_000, first), interrupt=handover)
        with pytest.raises(Refused) as info:
            async for step in stream:
                sent.extend(step.token_ids)
                if sent and gate.in_flight(D):
                    gate.hand_over(D, "handed over: worker w-1 switching to prefill")
        await stream.aclose()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert info.value.message == "handed over: worker w-1 switching to prefill"
    assert sent == list(range(len(sent))) and 0 < len(sent) < 10_000


def test_the_workers_table_shows_a_switch_and_a_pending_intent() -> None:
    from controlplane.cli import render
    from tandem.v1 import admin_pb2, registry_pb2

    long_id = "decode-gpu-node-with-a-long-name-0042"
    response = admin_pb2.ListWorkersResponse(workers=[
        admin_pb2.WorkerStatus(record=registry_pb2.WorkerRecord(
            worker_id=long_id, role=D, state=registry_pb2.WORKER_STATE_SWITCHING),
            role_intent=registry_pb2.RoleIntent(worker_id=long_id, role=D)),
        admin_pb2.WorkerStatus(record=registry_pb2.WorkerRecord(
            worker_id="p-1", role=P, state=registry_pb2.WORKER_STATE_READY),
            role_intent=registry_pb2.RoleIntent(worker_id="p-1", role=D)),
        admin_pb2.WorkerStatus(record=registry_pb2.WorkerRecord(
            worker_id="p-2", role=P, state=registry_pb2.WORKER_STATE_READY),
            role_intent=registry_pb2.RoleIntent(worker_id="p-2", role=P)),
    ])
    text = render.render_text(render.workers(response, now_ms=0, width=80), width=80)
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "switching (to decode)" in rows[long_id], text
    assert "ready (decode requested)" in rows["p-1"], text
    assert "requested" not in rows["p-2"], "an intent for the role it has is no news"
    assert render.role_set(admin_pb2.SetWorkerRoleResponse(intent=registry_pb2.RoleIntent(
        worker_id="d-0", role=P, reason="long prompts"))) == "worker d-0 switches to prefill (reason: long prompts)"
    assert render.role_cleared("d-0", admin_pb2.ClearWorkerRoleResponse(removed=False)) == \
        "worker d-0 had no role request"
