"""The best role assignment over classes of identical workers, ignoring switching limits. Pure.

Workers that share GPU type, GPU count, KV capacity, batch limit and
switchability are interchangeable to the predictor, so the search chooses
how many of each switchable class serve prefill (non-switchable workers
keep their role). Up to PlannerConfig.max_enumerated combinations it tries
them all, skipping any whose cheap upper bound (arrival, decode capacity,
the prefill pool's raw rate) cannot reach the best found; beyond that it
climbs from the current counts by single moves and swaps between classes.

Ranking: fewest workers short of the minimums, then the highest goodput
(equal within a relative 1e-9), then the fewest workers moved from the
current assignment, then the smallest counts in class order (classes
ordered by their first worker id) for determinism.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.planner.goodput import Group, Predictor, prefill_capacity
from controlplane.planner.types import DECODE, PREFILL, PlannerConfig, WorkerSupply

__all__ = ["Search", "WorkerClass", "classes_of", "longest_in_role_first"]

_TIE = 1e-9


def longest_in_role_first(w: WorkerSupply) -> tuple[float, str]:
    """Order in which members of a class move: longest time in their role, then worker id."""
    return (w.role_since_s, w.worker_id)


@dataclass(frozen=True)
class WorkerClass:
    """Interchangeable switchable workers; `members` longest in role first."""

    members: tuple[WorkerSupply, ...]

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def current_prefill(self) -> int:
        return sum(w.role == PREFILL for w in self.members)


def classes_of(workers: Sequence[WorkerSupply]) -> tuple[list[WorkerSupply], list[WorkerClass]]:
    """(non-switchable workers, classes of switchable ones ordered by first worker id)."""
    fixed = [w for w in workers if not w.switchable]
    grouped: dict[tuple[str, int, int, int], list[WorkerSupply]] = {}
    for w in sorted((w for w in workers if w.switchable), key=lambda w: w.worker_id):
        grouped.setdefault((w.gpu_type, w.gpu_count, w.kv_capacity_tokens, w.max_batch_size), []).append(w)
    return fixed, [WorkerClass(tuple(sorted(ms, key=longest_in_role_first))) for ms in grouped.values()]


class Search:
    """Scores prefill counts per class with one predictor."""

    def __init__(self, predictor: Predictor, fixed: Sequence[WorkerSupply], classes: Sequence[WorkerClass],
                 config: PlannerConfig) -> None:
        self.predictor, self.classes, self.config = predictor, list(classes), config
        self.arrival = max(0.0, predictor.demand.arrival_rps)
        fixed_prefill = [w for w in fixed if w.role == PREFILL]
        fixed_decode = [w for w in fixed if w.role == DECODE]
        self.fixed_prefill_n, self.fixed_decode_n = len(fixed_prefill), len(fixed_decode)
        self.fixed_groups = predictor.groups(fixed_prefill)
        self.fixed_decode_rps = sum(predictor.figures(w).decode_rps for w in fixed_decode)
        figures = [predictor.figures(c.members[0]) for c in self.classes]
        self.prefill = [(f.prefill_s, f.ttft_floor_s) for f in figures]
        self.decode_rps = [f.decode_rps for f in figures]
        self.current = tuple(c.current_prefill for c in self.classes)
        self._p_caps: dict[tuple[int, ...], float] = {}

    def violation(self, counts: Sequence[int]) -> int:
        prefill = self.fixed_prefill_n + sum(counts)
        decode = self.fixed_decode_n + sum(c.size for c in self.classes) - sum(counts)
        return (max(0, self.config.min_prefill_workers - prefill)
                + max(0, self.config.min_decode_workers - decode))

    def moved(self, counts: Sequence[int]) -> int:
        return sum(abs(k - c) for k, c in zip(counts, self.current, strict=True))

    def _decode_cap(self, counts: Sequence[int]) -> float:
        return self.fixed_decode_rps + sum((c.size - k) * r for c, k, r in zip(self.classes, counts,
                                                                                 self.decode_rps, strict=True))

    def _prefill_rate(self, counts: Sequence[int]) -> float:
        rate = sum(n / s for s, _, n in self.fixed_groups if math.isfinite(s))
        return rate + sum(k / s for k, (s, _) in zip(counts, self.prefill, strict=True) if k and math.isfinite(s))

    def _prefill_cap(self, counts: tuple[int, ...]) -> float:
        found = self._p_caps.get(counts)
        if found is None:
            groups: list[Group] = list(self.fixed_groups)
            groups += [(s, d, k) for k, (s, d) in zip(counts, self.prefill, strict=True) if k]
            found = self._p_caps[counts] = prefill_capacity(groups, self.predictor.slo.ttft_s)
        return found

    def _has_both(self, counts: Sequence[int]) -> bool:
        prefill = self.fixed_prefill_n + sum(counts)
        return prefill > 0 and self.fixed_decode_n + sum(c.size for c in self.classes) - sum(counts) > 0

    def goodput(self, counts: tuple[int, ...]) -> float:
        if not self._has_both(counts):
            return 0.0
        return min(self.arrival, self._decode_cap(counts), self._prefill_cap(counts))

    def _better(self, a: tuple[int, float, tuple[int, ...]], b: tuple[int, float, tuple[int, ...]] | None) -> bool:
        """Whether (violation, goodput, counts) `a` ranks above `b` (module docstring)."""
        if b is None:
            return True
        if a[0] != b[0]:
            return a[0] < b[0]
        if abs(a[1] - b[1]) > _TIE * max(abs(a[1]), abs(b[1]), 1e-12):
            return a[1] > b[1]
        if self.moved(a[2]) != self.moved(b[2]):
            return self.moved(a[2]) < self.moved(b[2])
        return a[2] < b[2]

    def best(self) -> tuple[int, ...]:
        """Prefill count per class of the best assignment."""
        combos = math.prod(c.size + 1 for c in self.classes)
        return self._enumerate() if combos <= self.config.max_enumerated else self._climb()

    def _enumerate(self) -> tuple[int, ...]:
        best: tuple[int, float, tuple[int, ...]] | None = None
        for counts in itertools.product(*(range(c.size + 1) for c in self.classes)):
            violation = self.violation(counts)
            if best is not None and violation > best[0]:
                continue
            if best is not None and violation == best[0]:
                # An upper bound on goodput: skip what can neither beat the best nor tie it with fewer moves.
                bound = min(self.arrival, self._decode_cap(counts), self._prefill_rate(counts))
                if not self._has_both(counts):
                    bound = 0.0
                if bound < best[1] * (1 - _TIE) or (bound <= best[1] * (1 + _TIE)
                                                     and self.moved(counts) >= self.moved(best[2])):
                    continue
            scored = (violation, self.goodput(counts), counts)
            if self._better(scored, best):
                best = scored
        return best[2] if best is not None else ()

    def _climb(self) -> tuple[int, ...]:
        n = len(self.classes)
        # One worker more or fewer on prefill in a class, or one traded between two classes.
        deltas = [tuple(d if k == i else 0 for k in range(n)) for i in range(n) for d in (1, -1)]
        deltas += [tuple(1 if k == i else -1 if k == j else 0 for k in range(n))
                   for i in range(n) for j in range(n) if i != j]
        best = (self.violation(self.current), self.goodput(self.current), self.current)
        for _ in range(2 * sum(c.size for c in self.classes) + 1):
            step = best
            for delta in deltas:
                counts = tuple(k + d for k, d in zip(best[2], delta, strict=True))
                if not all(0 <= k <= c.size for k, c in zip(counts, self.classes, strict=True)):
                    continue
                scored = (self.violation(counts), self.goodput(counts), counts)
                # Only a strictly better violation or goodput is progress (no drifting along ties).
                if (scored[0] < step[0] or (scored[0] == step[0] and scored[1] > step[1] * (1 + _TIE) + 1e-12)) \
                        and self._better(scored, step):
                    step = scored
            if step is best:
                break
            best = step
        return best[2]
