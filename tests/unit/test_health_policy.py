"""The health verdict state machine, driven one probe at a time with plain values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.health_policy import HealthTracker, Thresholds, WorkerHealth, step
from registry.routable import Health

K, M = 3, 2
RULES = Thresholds(failures=K, successes=M)


def run(results: list[bool], state: WorkerHealth | None = None, detail: str = "DEADLINE_EXCEEDED") -> WorkerHealth:
    state = state or WorkerHealth()
    for i, ok in enumerate(results):
        state = step(state, ok, "SERVING" if ok else detail, float(i), RULES)
    return state


def test_first_answer_decides_a_new_worker_at_once() -> None:
    state = run([True])
    assert (state.status, state.reason, state.changed_at) == (Health.SERVING, "answered SERVING", 0.0)


def test_not_serving_only_after_k_consecutive_failures_naming_the_last_error() -> None:
    serving = run([True])
    assert run([False] * (K - 1), serving).status is Health.SERVING
    down = run([False] * K, serving)
    assert down.status is Health.NOT_SERVING
    assert down.reason == "3 probes failed: DEADLINE_EXCEEDED"
    assert down.consecutive_failures == K and down.consecutive_successes == 0


def test_a_success_resets_the_failure_count() -> None:
    state = run([True, False, False, True, False, False])
    assert state.status is Health.SERVING and state.consecutive_failures == 2


def test_back_to_serving_only_after_m_consecutive_successes() -> None:
    down = run([True, False, False, False])
    assert run([True] * (M - 1), down).status is Health.NOT_SERVING
    assert run([True, False, True], down).status is Health.NOT_SERVING  # a failure restarts the count
    up = run([True] * M, down)
    assert (up.status, up.reason) == (Health.SERVING, "2 probes answered SERVING")


def test_a_new_worker_that_never_answers_turns_not_serving_after_k() -> None:
    assert run([False] * (K - 1)).status is Health.UNKNOWN
    state = run([False] * K, detail="UNAVAILABLE")
    assert (state.status, state.reason) == (Health.NOT_SERVING, "3 probes failed: UNAVAILABLE")


def test_staying_down_keeps_the_reason_and_change_time() -> None:
    down = run([True, False, False, False])
    later = step(down, False, "UNAVAILABLE", 99.0, RULES)
    assert later.reason == down.reason and later.changed_at == down.changed_at == 3.0
    assert later.checked_at == 99.0 and later.consecutive_failures == K + 1


def test_failed_gpu_is_not_serving_at_once_and_recovers_like_probes() -> None:
    serving = run([True])
    state = step(serving, True, "SERVING", 5.0, RULES, gpu_problem="GPU-1 health FAILED: XID 79")
    assert (state.status, state.reason) == (Health.NOT_SERVING, "GPU-1 health FAILED: XID 79")
    for t in range(M):
        assert state.status is Health.NOT_SERVING
        state = step(state, True, "SERVING", 6.0 + t, RULES)
    assert state.status is Health.SERVING


def test_tracker_seeds_from_a_previous_verdict_and_forgets_absent_workers() -> None:
    tracker = HealthTracker(RULES)
    tracker.seed("sick", Health.NOT_SERVING, "3 probes failed: UNAVAILABLE", 0.0, failures=7)
    transition = tracker.observe("sick", True, "SERVING", 1.0)
    assert not transition.changed and transition.new.reason == "3 probes failed: UNAVAILABLE"
    assert tracker.observe("fresh", True, "SERVING", 1.0).changed
    assert tracker.retain(["fresh"]) == ["sick"]
    assert tracker.workers() == ["fresh"] and tracker.get("sick") == WorkerHealth()


@pytest.mark.parametrize("failures,successes", [(0, 2), (3, 0), (101, 1)])
def test_thresholds_out_of_range_are_refused_by_name(failures: int, successes: int) -> None:
    with pytest.raises(ValueError, match=r"_threshold must be 1\.\.100"):
        Thresholds(failures=failures, successes=successes)


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_status_only_changes_on_a_full_streak(results: list[bool], k: int, m: int) -> None:
    rules = Thresholds(failures=k, successes=m)
    state = WorkerHealth()
    for i, ok in enumerate(results):
        new = step(state, ok, "x", float(i), rules)
        if new.status is Health.NOT_SERVING and state.status is not Health.NOT_SERVING:
            assert new.consecutive_failures >= k
        if new.status is Health.SERVING and state.status is Health.NOT_SERVING:
            assert new.consecutive_successes >= m
        assert new.status is not Health.UNKNOWN or state.status is Health.UNKNOWN  # never back to unknown
        state = new
