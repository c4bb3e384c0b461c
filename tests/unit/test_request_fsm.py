"""A request's life in the router, one event at a time: plain values in, actions out. No servers, no clock.

Each failure path of ARCHITECTURE.md "Failure handling" is a script of
(event, expected actions); every script ends by checking that nothing is
left behind: the machine is done and every KV handle a prefill worker
issued was either taken over by a decode worker or released.
"""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from router_svc.request_events import (
    Action,
    CallDecode,
    CallPrefill,
    Cancelled,
    Choose,
    Chosen,
    Code,
    DeadlinePassed,
    DecodeEnded,
    DecodeFailed,
    DecodeStepped,
    Emit,
    Event,
    Fail,
    Finish,
    KvRef,
    Migrate,
    NoRoute,
    PrefillAnswered,
    PrefillFailed,
    Release,
    Stalled,
    Suspect,
    Worker,
)
from router_svc.request_fsm import Phase, ProtocolError, RequestLife

P0, P1 = Worker("p0", "10.0.0.1:1", "h1"), Worker("p1", "10.0.0.2:1", "h2")
D0, D1, D2 = Worker("d0", "10.0.1.1:1", "h3"), Worker("d1", "10.0.1.2:1", "h4"), Worker("d2", "10.0.1.3:1", "h5")
H1 = KvRef(P0.endpoint, "kv-1")
H2 = KvRef(P1.endpoint, "kv-2")
NOBODY: frozenset[str] = frozenset()
START = None  # in a script: call start() instead of step()


def new_life(*, max_attempts: int = 8, capacity_wait_s: float = 5.0, deadline: float | None = None) -> RequestLife:
    return RequestLife("r1", now=0.0, max_attempts=max_attempts, capacity_wait_s=capacity_wait_s,
                       prefill_timeout_s=120.0, deadline=deadline)


@dataclass
class Ledger:
    """Which KV handles were issued, taken over by a decode worker, released; which tokens were emitted."""

    issued: list[KvRef] = field(default_factory=list)
    taken: list[KvRef] = field(default_factory=list)
    released: list[KvRef] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)
    decode_handle: KvRef | None = None
    decode_stepped: bool = False

    def saw(self, event: Event | None, actions: list[Action]) -> None:
        if isinstance(event, PrefillAnswered) and event.handle is not None:
            self.issued.append(event.handle)
        if isinstance(event, DecodeStepped) and not self.decode_stepped:
            self.decode_stepped = True
            if self.decode_handle is not None:
                self.taken.append(self.decode_handle)
        for action in actions:
            if isinstance(action, Release):
                self.released.append(action.handle)
            elif isinstance(action, Emit):
                self.emitted.extend(action.tokens)
            elif isinstance(action, CallDecode):
                self.decode_handle, self.decode_stepped = action.handle, False

    def assert_nothing_left(self, life: RequestLife) -> None:
        assert life.done and life.phase is Phase.DONE
        assert life.open_handle is None
        assert len(self.released) == len(set(self.released)), f"a handle released twice: {self.released}"
        assert not set(self.released) & set(self.taken), "released a handle a decode worker had taken over"
        assert sorted(self.issued, key=str) == sorted(self.released + self.taken, key=str), \
            f"handles left to their TTL: issued {self.issued}, taken {self.taken}, released {self.released}"
        assert self.emitted == life.generated


Script = list[tuple[Event | None, list[object]]]


def play(life: RequestLife, script: Script) -> Ledger:
    """Feeds each event; its actions must equal the expected ones (a class matches any instance of it)."""
    ledger = Ledger()
    for event, expected in script:
        actions = life.start() if event is None else life.step(event)
        assert len(actions) == len(expected) and all(
            isinstance(got, want) if isinstance(want, type) else got == want
            for got, want in zip(actions, expected, strict=True)), \
            f"after {event}:\n  got      {actions}\n  expected {expected}"
        ledger.saw(event, actions)
    return ledger


def finished(life: RequestLife, script: Script) -> Ledger:
    ledger = play(life, script)
    ledger.assert_nothing_left(life)
    return ledger


def choose(exclude: frozenset[str] = NOBODY, *, local: bool = False, produced: int = 0, wait_s: float = 0.0) -> Choose:
    return Choose(exclude=exclude, local=local, produced=produced, wait_s=wait_s)


def decode(worker: Worker, handle: KvRef | None = None, *, first: int | None = None, generated: tuple[int, ...] = (),
           timeout_s: float | None = None) -> CallDecode:
    return CallDecode(worker, handle, first_token=first, generated=generated, timeout_s=timeout_s)


def prefill(worker: Worker, consumer: Worker = D0, timeout_s: float = 120.0) -> CallPrefill:
    return CallPrefill(worker, consumer_host=consumer.host, timeout_s=timeout_s)


# -- the way it should go --------------------------------------------------------

def test_disaggregated_request_reports_its_route_and_timings() -> None:
    life = new_life()
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.010, D0, P0, "expected-time"), [prefill(P0)]),
        (PrefillAnswered(0.100, 7, H1, queue_ms=5, prefill_ms=80, cached_prompt_tokens=16),
         [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeStepped(0.130, (8, 9), kv_transfer_ms=12), [Emit((8, 9))]),
        (DecodeStepped(0.150, (10,), finish_reason="length"), [Emit((10,)), Finish]),
    ])
    assert ledger.taken == [H1] and ledger.released == []
    o = life.outcome
    assert (o.prefill_worker_id, o.decode_worker_id, o.local_prefill, o.reason) == ("p0", "d0", False, "expected-time")
    assert (o.finish_reason, o.completion_tokens, o.retries, o.migrations) == ("length", 4, 0, 0)
    assert o.queue_ms == pytest.approx(10 + 5) and o.prefill_ms == 80 and o.cached_prompt_tokens == 16
    assert o.kv_transfer_ms == 12 and o.ttft_ms == pytest.approx(100)
    assert o.decode_ms == pytest.approx(50) and o.e2e_ms == pytest.approx(150)
    assert o.token_times == [0.100, 0.130, 0.130, 0.150]


def test_local_prefill_takes_its_prefill_time_from_the_first_step() -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, None, "short-prompt"), [decode(D0)]),
        (DecodeStepped(0.2, (5,), prefill_ms=150), [Emit((5,))]),
        (DecodeStepped(0.3, (6,), finish_reason="stop_token"), [Emit((6,)), Finish]),
    ])
    o = life.outcome
    assert o.local_prefill and o.prefill_worker_id == "" and o.prefill_ms == 150 and o.ttft_ms == pytest.approx(200)


def test_a_prefill_that_ends_the_sequence_needs_no_decode() -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 2, None, finish_reason="stop_token"), [Emit((2,)), Finish]),
    ])
    assert life.outcome.finish_reason == "stop_token" and life.outcome.completion_tokens == 1


# -- P fails or times out: another P, or a local prefill on D ---------------------

@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.UNKNOWN])
def test_a_prefill_worker_in_trouble_becomes_a_suspect_and_another_prefills(code: Code) -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillFailed(1.0, code, "boom"), [Suspect("p0", forget_load=True), choose(frozenset({"p0"}))]),
        (Chosen(1.0, D0, P1), [prefill(P1)]),
        (PrefillAnswered(1.1, 7, H2), [Emit((7,)), decode(D0, H2, first=7)]),
        (DecodeStepped(1.2, (8,), finish_reason="length"), [Emit((8,)), Finish]),
    ])
    assert life.outcome.retries == 1 and life.outcome.prefill_worker_id == "p1"


@pytest.mark.parametrize("code", [Code.RESOURCE_EXHAUSTED, Code.ABORTED, Code.CANCELLED, Code.NOT_FOUND])
def test_other_prefill_failures_exclude_the_worker_without_suspecting_it(code: Code) -> None:
    life = new_life()
    play(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillFailed(1.0, code), [choose(frozenset({"p0"}))]),
    ])


def test_a_prefill_timeout_falls_back_to_a_local_prefill_on_the_decode_worker() -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillFailed(120.0, Code.DEADLINE_EXCEEDED), [Suspect("p0", forget_load=True), choose(frozenset({"p0"}))]),
        (Chosen(120.0, D0, None, "no-prefill-worker"), [decode(D0)]),
        (DecodeStepped(121.0, (7, 8), finish_reason="length"), [Emit((7, 8)), Finish]),
    ])
    assert life.outcome.local_prefill and life.outcome.retries == 1


# -- D fails before its first token: another D, the handle reused -----------------

def test_a_decode_failure_before_the_first_step_reuses_the_handle_on_another_decode_worker() -> None:
    life = new_life()
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeFailed(0.2, Code.UNAVAILABLE), [Suspect("d0", forget_load=True), choose(frozenset({"d0"}),
                                                                                       produced=1)]),
        # The policy offers a prefill worker too: the handle makes it unnecessary.
        (Chosen(0.2, D1, P1), [decode(D1, H1, first=7)]),
        (DecodeStepped(0.3, (8,), finish_reason="length"), [Emit((8,)), Finish]),
    ])
    assert ledger.taken == [H1] and ledger.emitted == [7, 8]
    assert life.outcome.retries == 1 and life.outcome.migrations == 0
    assert life.outcome.prefill_worker_id == "p0" and life.outcome.decode_worker_id == "d1"


# -- D fails mid-stream: migrate from prompt + tokens sent ------------------------

@pytest.mark.parametrize("failure", [DecodeFailed(0.5, Code.UNAVAILABLE, "connection reset"), DecodeEnded(0.5)],
                         ids=["unavailable", "ended-without-finish"])
def test_a_decode_failure_mid_stream_migrates_with_no_lost_or_repeated_token(failure: Event) -> None:
    life = new_life()
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeStepped(0.2, (8, 9)), [Emit((8, 9))]),
        (failure, [Suspect("d0", forget_load=True), Migrate("d0", produced=3, why="UNAVAILABLE"),
                   choose(frozenset({"d0"}), local=True, produced=3)]),
        (Chosen(0.6, D1, None, "local-required"), [decode(D1, generated=(7, 8, 9))]),
        (DecodeStepped(0.7, (10, 11), prefill_ms=30), [Emit((10, 11))]),
        (DecodeStepped(0.8, (12,), finish_reason="length"), [Emit((12,)), Finish]),
    ])
    assert ledger.emitted == [7, 8, 9, 10, 11, 12]
    o = life.outcome
    assert (o.migrations, o.retries, o.local_prefill, o.prefill_worker_id, o.decode_worker_id) == \
        (1, 0, True, "", "d1")
    assert o.completion_tokens == 6 and o.prefill_ms == 30


# -- the handle refused: FAILED_PRECONDITION and NOT_FOUND -----------------------

def test_a_handle_of_another_layout_is_released_at_once_and_the_kv_rebuilt_elsewhere() -> None:
    life = new_life()
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeFailed(0.2, Code.FAILED_PRECONDITION, "KV block_size differs"),
         [Release(H1), choose(frozenset({"d0"}), local=True, produced=1)]),
        (Chosen(0.2, D1, None, "local-required"), [decode(D1, generated=(7,))]),
        (DecodeStepped(0.3, (8,), finish_reason="length"), [Emit((8,)), Finish]),
    ])
    assert ledger.released == [H1] and ledger.taken == []
    assert life.outcome.retries == 1 and life.outcome.local_prefill


def test_an_expired_handle_is_rebuilt_by_a_local_prefill_and_released_for_good_measure() -> None:
    # NOT_FOUND: the handle is most likely gone already; the release is harmless if so, and frees it if the
    # worker meant something else. The decode worker is not to blame and may be chosen again.
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeFailed(0.2, Code.NOT_FOUND, "no handle kv-1"), [Release(H1), choose(local=True, produced=1)]),
        (Chosen(0.2, D0, None, "local-required"), [decode(D0, generated=(7,))]),
        (DecodeStepped(0.3, (8,), finish_reason="length"), [Emit((8,)), Finish]),
    ])


def test_not_found_without_a_handle_is_an_ordinary_worker_failure() -> None:
    life = new_life()
    play(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, None), [decode(D0)]),
        (DecodeFailed(0.2, Code.NOT_FOUND), [choose(frozenset({"d0"}))]),
    ])


# -- stalls ------------------------------------------------------------------------

def test_a_stalled_stream_migrates_and_its_worker_becomes_a_suspect() -> None:
    life = new_life()
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, None), [decode(D0)]),
        (DecodeStepped(0.1, (7, 8)), [Emit((7, 8))]),
        (Stalled(30.1), [Suspect("d0", forget_load=False), Migrate("d0", produced=2, why="stalled"),
                         choose(frozenset({"d0"}), local=True, produced=2)]),
        (Chosen(30.1, D1, None), [decode(D1, generated=(7, 8))]),
        (DecodeStepped(30.2, (9,), finish_reason="length"), [Emit((9,)), Finish]),
    ])
    assert ledger.emitted == [7, 8, 9] and life.outcome.migrations == 1


def test_a_stall_before_the_first_step_keeps_the_handle_for_the_next_decode_worker() -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (Stalled(30.1), [Suspect("d0", forget_load=False), Migrate("d0", produced=1, why="stalled"),
                         choose(frozenset({"d0"}), produced=1)]),
        (Chosen(30.1, D1, None), [decode(D1, H1, first=7)]),
        (DecodeStepped(30.2, (8,), finish_reason="length"), [Emit((8,)), Finish]),
    ])


# -- the client leaves ---------------------------------------------------------------

def test_a_client_cancel_releases_the_handle_and_makes_no_more_calls() -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (Cancelled(0.15), [Release(H1)]),
        (Cancelled(0.16), []),  # safe twice: the driver's way out always feeds one
    ])
    with pytest.raises(ProtocolError):
        life.step(DecodeStepped(0.2, (8,)))


@pytest.mark.parametrize("phase_script", ["choosing", "prefilling", "decoding-after-first-step"])
def test_a_cancel_without_a_handle_releases_nothing(phase_script: str) -> None:
    scripts: dict[str, Script] = {
        "choosing": [(START, [choose()])],
        "prefilling": [(START, [choose()]), (Chosen(0.0, D0, P0), [prefill(P0)])],
        "decoding-after-first-step": [
            (START, [choose()]), (Chosen(0.0, D0, P0), [prefill(P0)]),
            (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
            (DecodeStepped(0.2, (8,)), [Emit((8,))])],
    }
    life = new_life()
    finished(life, [*scripts[phase_script], (Cancelled(1.0), [])])


# -- the deadline ----------------------------------------------------------------------

def test_worker_calls_get_the_time_left_before_the_deadline() -> None:
    life = new_life(deadline=10.0)
    play(life, [
        (START, [choose()]),
        (Chosen(2.0, D0, P0), [prefill(P0, timeout_s=8.0)]),
        (PrefillAnswered(4.0, 7, H1), [Emit((7,)), decode(D0, H1, first=7, timeout_s=6.0)]),
    ])
    unbounded = new_life()
    play(unbounded, [(START, [choose()]), (Chosen(2.0, D0, P0), [prefill(P0, timeout_s=120.0)])])
    late = new_life(deadline=500.0)
    play(late, [(START, [choose()]), (Chosen(2.0, D0, P0), [prefill(P0, timeout_s=120.0)])])


def test_a_passed_deadline_releases_the_handle_and_fails_with_deadline_exceeded() -> None:
    life = new_life(deadline=1.0)
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0, timeout_s=1.0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7, timeout_s=0.9)]),
        (DeadlinePassed(1.0), [Release(H1), Fail]),
        (DeadlinePassed(1.1), []),
    ])
    assert ledger.released == [H1]


@pytest.mark.parametrize("failure", [DecodeFailed(1.0, Code.DEADLINE_EXCEEDED), DecodeFailed(1.2, Code.UNAVAILABLE),
                                     Stalled(1.5)], ids=["deadline-exceeded", "unavailable", "stalled"])
def test_a_failure_at_the_deadline_blames_no_worker_and_is_not_retried(failure: Event) -> None:
    life = new_life(deadline=1.0)
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0, timeout_s=1.0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7, timeout_s=0.9)]),
        (failure, [Release(H1), Fail]),
    ])
    assert ledger.released == [H1]


def test_deadline_failures_say_what_happened() -> None:
    life = new_life(deadline=1.0)
    play(life, [(START, [choose()]), (Chosen(0.0, D0, None), [decode(D0, timeout_s=1.0)])])
    (fail,) = life.step(DecodeFailed(1.0, Code.DEADLINE_EXCEEDED))
    assert fail == Fail(Code.DEADLINE_EXCEEDED, "request r1 passed its deadline after 1 attempt(s) and 0 token(s)")


def test_a_pair_chosen_after_the_deadline_is_not_called() -> None:
    life = new_life(deadline=1.0)
    finished(life, [(START, [choose()]), (Chosen(1.0, D0, P0), [Fail])])


# -- no pair: bounded wait, then RESOURCE_EXHAUSTED or UNAVAILABLE -------------------

def test_no_capacity_waits_for_the_view_then_answers_resource_exhausted_with_the_hint() -> None:
    life = new_life(capacity_wait_s=5.0)
    finished(life, [
        (START, [choose()]),
        (NoRoute(0.0, "all 2 decode workers full", no_capacity=True, retry_after_s=1.5), [choose(wait_s=0.05)]),
        # The last wait ends with capacity_wait_s (times chosen to be exact in binary).
        (NoRoute(4.96875, "all 2 decode workers full", no_capacity=True, retry_after_s=1.5),
         [choose(wait_s=0.03125)]),
        (NoRoute(5.0, "all 2 decode workers full", no_capacity=True, retry_after_s=1.5),
         [Fail(Code.RESOURCE_EXHAUSTED, "all 2 decode workers full", 1.5)]),
    ])
    assert life.attempts == 1  # waiting is not an attempt


def test_no_worker_answers_unavailable_without_a_hint() -> None:
    life = new_life(capacity_wait_s=5.0)
    finished(life, [
        (START, [choose()]),
        (NoRoute(5.0, "no routable worker serves m", retry_after_s=9), [Fail(Code.UNAVAILABLE,
                                                                             "no routable worker serves m")]),
    ])


def test_workers_that_refused_as_full_make_the_answer_resource_exhausted_not_unavailable() -> None:
    life = new_life(capacity_wait_s=5.0)
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, None), [decode(D0)]),
        (DecodeFailed(0.1, Code.RESOURCE_EXHAUSTED), [choose(frozenset({"d0"}))]),
        (NoRoute(5.1, "no routable decode worker serves m"),
         [Fail(Code.RESOURCE_EXHAUSTED, "no routable decode worker serves m; 1 worker(s) refused this request as full",
               1.0)]),
    ])


def test_a_capacity_becoming_free_during_the_wait_is_taken() -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (NoRoute(0.0, "full", no_capacity=True), [choose(wait_s=0.05)]),
        (Chosen(0.3, D0, None), [decode(D0)]),
        (DecodeStepped(0.4, (1,), finish_reason="length"), [Emit((1,)), Finish]),
    ])
    assert life.outcome.queue_ms == pytest.approx(300)


def test_the_deadline_shortens_the_capacity_wait() -> None:
    life = new_life(capacity_wait_s=5.0, deadline=1.0)
    finished(life, [
        (START, [choose()]),
        (NoRoute(0.984375, "full", no_capacity=True, retry_after_s=1.0), [choose(wait_s=0.015625)]),
        (NoRoute(1.0, "full", no_capacity=True, retry_after_s=1.0), [Fail(Code.RESOURCE_EXHAUSTED, "full", 1.0)]),
    ])


def test_no_route_for_a_held_handle_releases_it() -> None:
    life = new_life()
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeFailed(0.2, Code.UNAVAILABLE), [Suspect("d0", forget_load=True), choose(frozenset({"d0"}),
                                                                                       produced=1)]),
        (NoRoute(5.2, "no other decode worker"), [Release(H1), Fail(Code.UNAVAILABLE, "no other decode worker")]),
    ])
    assert ledger.released == [H1]


# -- client errors are not retried ---------------------------------------------------

def test_a_client_error_from_a_prefill_worker_is_answered_as_is() -> None:
    life = new_life()
    finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillFailed(0.1, Code.INVALID_ARGUMENT, "token id 99999 is out of range"),
         [Fail(Code.INVALID_ARGUMENT, "token id 99999 is out of range")]),
    ])
    assert life.outcome.retries == 0 and life.exclude == set()


@pytest.mark.parametrize("code", [Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE])
def test_a_client_error_from_a_decode_worker_releases_the_handle_and_is_not_retried(code: Code) -> None:
    life = new_life()
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeFailed(0.2, code), [Release(H1), Fail(code, code.name)]),
    ])
    assert ledger.released == [H1]


# -- max attempts ------------------------------------------------------------------------

def test_max_attempts_answers_unavailable_naming_the_workers_tried_and_releases_the_handle() -> None:
    life = new_life(max_attempts=3)
    ledger = finished(life, [
        (START, [choose()]),
        (Chosen(0.0, D0, P0), [prefill(P0)]),
        (PrefillAnswered(0.1, 7, H1), [Emit((7,)), decode(D0, H1, first=7)]),
        (DecodeFailed(0.2, Code.ABORTED), [choose(frozenset({"d0"}), produced=1)]),
        (Chosen(0.2, D1, None), [decode(D1, H1, first=7)]),
        (DecodeFailed(0.3, Code.ABORTED), [choose(frozenset({"d0", "d1"}), produced=1)]),
        (Chosen(0.3, D2, None), [decode(D2, H1, first=7)]),
        (DecodeFailed(0.4, Code.ABORTED), [
            Release(H1),
            Fail(Code.UNAVAILABLE, "request r1 failed on 3 workers; giving up (tried: d0, d1, d2)")]),
    ])
    assert ledger.released == [H1] and life.outcome.retries == 3


# -- the machine's own contract ----------------------------------------------------------

def test_events_out_of_turn_are_protocol_errors() -> None:
    life = new_life()
    with pytest.raises(ProtocolError):
        life.step(Chosen(0.0, D0, None))  # before start()
    life.start()
    for event in (PrefillAnswered(0.0, 1, H1), DecodeStepped(0.0, (1,)), DecodeFailed(0.0, Code.UNAVAILABLE),
                  Stalled(0.0)):
        with pytest.raises(ProtocolError):
            life.step(event)
    life.step(Chosen(0.0, D0, P0))
    with pytest.raises(ProtocolError, match="finish reason"):
        life.step(PrefillAnswered(0.1, 1, None))
    with pytest.raises(ProtocolError):
        life.start()


def test_the_core_imports_no_grpc_asyncio_or_etcd() -> None:
    code = ("import sys, router_svc.request_fsm; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'grpc', 'asyncio', 'etcd3aio', 'registry', 'tandem', 'google'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- whatever fails, the client sees the sequence exactly once ---------------------------

def _sequence(i: int) -> int:
    """The model's i-th token for the prompt (sim-style: a pure function of the context)."""
    return 1000 + i


@pytest.mark.parametrize("seed", range(40))
def test_random_failures_lose_and_repeat_no_token_and_leave_no_handle(seed: int) -> None:
    """A toy fleet that fails at random: the emitted tokens are the sequence, once; no handle outlives the run."""
    rng = random.Random(seed)
    max_tokens = rng.randint(1, 12)
    life = new_life(max_attempts=30)
    ledger = Ledger()
    decoders = [Worker(f"d{i}", f"10.0.1.{i}:1") for i in range(40)]
    prefillers = [Worker(f"p{i}", f"10.0.0.{i}:1") for i in range(40)]
    issued = 0
    actions = life.start()
    ledger.saw(None, actions)
    outstanding: Action | None = None
    position = 0  # the sequence index the current decode call produces next
    stepped = False
    for tick in range(1, 1000):
        now = tick / 100
        asks = [a for a in actions if isinstance(a, Choose | CallPrefill | CallDecode)]
        if life.done:
            break
        if asks:
            (outstanding,) = asks
            if isinstance(outstanding, CallDecode):
                position = len(outstanding.generated) + (1 if outstanding.handle is not None else 0)
                stepped = False
        event: Event
        if isinstance(outstanding, Choose):
            decoder = rng.choice([d for d in decoders if d.worker_id not in outstanding.exclude])
            local = outstanding.local or rng.random() < 0.3
            pick = None if local else rng.choice([p for p in prefillers if p.worker_id not in outstanding.exclude])
            event = Chosen(now, decoder, pick)
        elif isinstance(outstanding, CallPrefill):
            if rng.random() < 0.2:
                event = PrefillFailed(now, rng.choice([Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.ABORTED]))
            elif max_tokens == 1:
                event = PrefillAnswered(now, _sequence(0), None, finish_reason="length")
            else:
                issued += 1
                event = PrefillAnswered(now, _sequence(0), KvRef(outstanding.worker.endpoint, f"kv-{issued}"))
        else:
            assert isinstance(outstanding, CallDecode)
            roll = rng.random()
            if roll < 0.1:
                event = DecodeFailed(now, rng.choice([Code.UNAVAILABLE, Code.INTERNAL, Code.ABORTED]))
            elif roll < 0.15:
                event = Stalled(now)
            elif roll < 0.25 and outstanding.handle is not None and not stepped:
                event = DecodeFailed(now, rng.choice([Code.NOT_FOUND, Code.FAILED_PRECONDITION]))
            else:
                n = min(rng.randint(1, 3), max_tokens - position)
                tokens = tuple(_sequence(i) for i in range(position, position + n))
                position += n
                stepped = True
                event = DecodeStepped(now, tokens, finish_reason="length" if position == max_tokens else "")
        actions = life.step(event)
        ledger.saw(event, actions)
    ledger.assert_nothing_left(life)
    if life.outcome.finish_reason:
        assert ledger.emitted == [_sequence(i) for i in range(max_tokens)]
    else:
        assert ledger.emitted == [_sequence(i) for i in range(len(ledger.emitted))]
