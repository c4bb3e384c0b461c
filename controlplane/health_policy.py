"""Health verdicts from probe results: a pure state machine per worker.

Zero I/O: the prober (controlplane.prober) feeds it one probe result at a
time with the current time, and writes what it decides. Unit-tested with
plain values.

Rules, per worker:
- A worker starts UNKNOWN (no verdict). Its first successful probe makes it
  SERVING at once: a worker that answers has nothing to prove.
- `failures` consecutive failed probes (default 3) make it NOT_SERVING, with
  the reason naming the last failure ("3 probes failed: DEADLINE_EXCEEDED").
- From NOT_SERVING, `successes` consecutive successful probes (default 2)
  make it SERVING again.
- A failed GPU (NVML health FAILED, reported by the node agent) makes it
  NOT_SERVING at once: the agent has already debounced that signal, and no
  request should land on a GPU that lost its memory or fell off the bus.
- A worker absent from the registry loses its state (`retain`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from registry.routable import Health

DEFAULT_FAILURES = 3
DEFAULT_SUCCESSES = 2
MAX_THRESHOLD = 100

@dataclass(frozen=True)
class Thresholds:
    """Consecutive probe results needed to change a verdict."""

    failures: int = DEFAULT_FAILURES
    successes: int = DEFAULT_SUCCESSES

    def __post_init__(self) -> None:
        for name, value in (("failure_threshold", self.failures), ("success_threshold", self.successes)):
            if not 1 <= value <= MAX_THRESHOLD:
                raise ValueError(f"{name} must be 1..{MAX_THRESHOLD}, got {value}")


@dataclass(frozen=True)
class WorkerHealth:
    """What the policy knows about one worker. Immutable: `step` returns a new value."""

    status: Health = Health.UNKNOWN
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    reason: str = ""
    # Wall-clock seconds of the last probe and of the last status change.
    checked_at: float = 0.0
    changed_at: float = 0.0


def step(state: WorkerHealth, ok: bool, detail: str, now: float, thresholds: Thresholds,
         gpu_problem: str = "") -> WorkerHealth:
    """The state after one probe.

    `ok`: the worker answered SERVING in time; `detail` says what it answered
    otherwise ("NOT_SERVING", "DEADLINE_EXCEEDED", "UNAVAILABLE"). A
    non-empty `gpu_problem` ("GPU-1 health FAILED: ...") counts as a failure
    that needs no threshold.
    """
    if gpu_problem:
        return _to(state, Health.NOT_SERVING, gpu_problem, now, failures=state.consecutive_failures + 1,
                   successes=0)
    if ok:
        successes = state.consecutive_successes + 1
        if state.status is Health.UNKNOWN:
            return _to(state, Health.SERVING, "answered SERVING", now, failures=0, successes=successes)
        if state.status is Health.NOT_SERVING and successes >= thresholds.successes:
            reason = f"{successes} probes answered SERVING"
            return _to(state, Health.SERVING, reason, now, failures=0, successes=successes)
        return replace(state, consecutive_failures=0, consecutive_successes=successes, checked_at=now)
    failures = state.consecutive_failures + 1
    if state.status is not Health.NOT_SERVING and failures >= thresholds.failures:
        noun = "probe" if failures == 1 else "probes"
        return _to(state, Health.NOT_SERVING, f"{failures} {noun} failed: {detail}", now,
                   failures=failures, successes=0)
    return replace(state, consecutive_failures=failures, consecutive_successes=0, checked_at=now)


def _to(state: WorkerHealth, status: Health, reason: str, now: float, *, failures: int,
        successes: int) -> WorkerHealth:
    changed = status is not state.status
    return WorkerHealth(
        status=status,
        consecutive_failures=failures,
        consecutive_successes=successes,
        reason=reason,
        checked_at=now,
        changed_at=now if changed else state.changed_at,
    )


@dataclass(frozen=True)
class Transition:
    """One probe's effect on one worker."""

    worker_id: str
    old: WorkerHealth
    new: WorkerHealth

    @property
    def changed(self) -> bool:
        return self.old.status is not self.new.status


class HealthTracker:
    """WorkerHealth for every probed worker. Not thread-safe; one owner (the prober)."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self._states: dict[str, WorkerHealth] = {}

    def get(self, worker_id: str) -> WorkerHealth:
        return self._states.get(worker_id, WorkerHealth())

    def workers(self) -> list[str]:
        return sorted(self._states)

    def observe(self, worker_id: str, ok: bool, detail: str, now: float, gpu_problem: str = "") -> Transition:
        old = self.get(worker_id)
        new = step(old, ok, detail, now, self.thresholds, gpu_problem)
        self._states[worker_id] = new
        return Transition(worker_id, old, new)

    def seed(self, worker_id: str, status: Health, reason: str, now: float, *, failures: int = 0,
             successes: int = 0) -> None:
        """Starts a worker from a verdict someone else wrote (a previous leader), so
        a NOT_SERVING worker stays NOT_SERVING until it earns its way back."""
        self._states[worker_id] = WorkerHealth(status=status, consecutive_failures=failures,
                                               consecutive_successes=successes, reason=reason,
                                               checked_at=now, changed_at=now)

    def retain(self, worker_ids: Iterable[str]) -> list[str]:
        """Drops every worker not in `worker_ids`; returns the dropped ones."""
        keep = set(worker_ids)
        dropped = [w for w in self._states if w not in keep]
        for worker_id in dropped:
            del self._states[worker_id]
        return sorted(dropped)

    def reset(self, worker_id: str) -> None:
        """Forgets one worker (it came back at a new endpoint: a new incarnation)."""
        self._states.pop(worker_id, None)

    def clear(self) -> None:
        self._states.clear()
