"""plan_roles: which worker serves which role next, within the switching limits. Pure: time is `now_s`.

1. The best assignment ignoring the limits (controlplane.planner.search);
   within a class of identical workers the ones longest in their role are
   the ones that move.
2. The moves toward it that the limits allow: a worker that took its role
   less than `min_dwell_s` ago stays (the search is rerun with it pinned,
   so a worker of another class may stand in); non-switchable workers never
   move; at most `max_switches` move, chosen as the subset of wanted moves
   with the highest predicted goodput (never below the current one, never
   leaving fewer than the minimum workers of a role). The hysteresis is
   judged on the assignment the moves head for (the best reachable past
   the dwell): moves start only when its goodput >= current x (1 +
   min_gain), or when it brings the fleet closer to the minimums, or when
   the fleet is missing its SLO now (an attained p90 above its target)
   and the current assignment is predicted short of the arrival rate: a
   queue is building, and any gain drains it (no flapping follows: once
   demand is met no assignment gains anything, so nothing moves back); each
   round's step is then never worse than the current assignment, so a
   target two switches away is reached even when the first alone gains
   little.
3. Without demand (no arrivals, or no lengths) nothing moves unless a
   minimum is violated: there is nothing to predict a gain from.

Estimates in the Plan are the planner's own predictions; with
gpu_blind=True that is the view of a fleet whose every GPU is the fleet's
average (what a GPU-blind planner would believe).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from controlplane.planner.explain import change_why, explanation, saw
from controlplane.planner.goodput import Predictor, split_roles
from controlplane.planner.search import Search, classes_of, longest_in_role_first
from controlplane.planner.types import (
    DECODE,
    PREFILL,
    Change,
    Demand,
    GoodputEstimate,
    Plan,
    PlannerConfig,
    Slo,
    WorkerSupply,
)
from router_svc.costmodel import CostModel, ModelShape
from runtime.catalog import GpuCatalog, GpuModel
from runtime.stepmodel import FALLBACK_LINK_BYTES_PER_S

__all__ = ["FLEET_AVERAGE_GPU", "plan_roles"]

FLEET_AVERAGE_GPU = "fleet-average"
# Subsets of wanted moves tried exhaustively up to this many; a greedy pick beyond.
_MAX_SUBSETS = 4096
_TIE = 1e-9
DEFAULT_CONFIG = PlannerConfig()


def _blind(cost: CostModel, workers: Sequence[WorkerSupply]) -> tuple[CostModel, list[WorkerSupply]]:
    """A cost model and fleet in which every GPU is the fleet's average GPU (per-GPU mean of each figure)."""
    gpus = [(cost.gpu(w.gpu_type), max(1, w.gpu_count)) for w in workers]
    total = sum(n for _, n in gpus) or 1

    def mean(figure: str) -> float:
        return sum(getattr(g, figure) * n for g, n in gpus) / total

    average = GpuModel(
        catalog_id=FLEET_AVERAGE_GPU, nvml_names=(), bf16_tflops=mean("bf16_tflops"),
        memory_gb=mean("memory_gb"), hbm_tbps=mean("hbm_tbps"), fp8_tflops=mean("fp8_flops") / 1e12,
        link_gbps=sum((g.link_bytes_per_s or FALLBACK_LINK_BYTES_PER_S) * n for g, n in gpus) / total / 1e9)
    catalog = GpuCatalog({**{m.catalog_id: m for m in cost.catalog}, FLEET_AVERAGE_GPU: average})
    return CostModel(catalog, cost.config, cost.params), [replace(w, gpu_type=FLEET_AVERAGE_GPU) for w in workers]


def _violation(roles: Mapping[str, str], config: PlannerConfig) -> int:
    prefill = sum(r == PREFILL for r in roles.values())
    return max(0, config.min_prefill_workers - prefill) + max(0, config.min_decode_workers - (len(roles) - prefill))


def _flip(role: str) -> str:
    return DECODE if role == PREFILL else PREFILL


def _best_assignment(view: Sequence[WorkerSupply], search: Search, counts: Sequence[int]) -> dict[str, str]:
    roles = {w.worker_id: w.role for w in view}
    for cls, want in zip(search.classes, counts, strict=True):
        delta = want - cls.current_prefill
        source = DECODE if delta > 0 else PREFILL
        movers = [w for w in cls.members if w.role == source][:abs(delta)]  # members are longest in role first
        for w in movers:
            roles[w.worker_id] = _flip(source)
    return roles


def _subsets(eligible: Sequence[WorkerSupply], cap: int) -> list[tuple[WorkerSupply, ...]]:
    sizes = range(0, min(cap, len(eligible)) + 1)
    if sum(math.comb(len(eligible), k) for k in sizes) <= _MAX_SUBSETS:
        return [s for k in sizes for s in itertools.combinations(eligible, k)]
    return []


def _step(eligible: Sequence[WorkerSupply], config: PlannerConfig, current_violation: int, current_goodput: float,
          after: Callable[[Sequence[WorkerSupply]], dict[str, str]],
          goodput: Callable[[Mapping[str, str]], float]) -> tuple[WorkerSupply, ...]:
    """The moves to make this round: at most max_switches of `eligible` (all toward the target), none
    leaving goodput below the current or the fleet further from the minimums; the fewest short of the
    minimums, then the highest goodput, then the most progress; equal ones: longest in role first."""
    cap = max(0, config.max_switches)
    candidates = _subsets(eligible, cap)
    if not candidates:  # too many to try: add the best single move while there is room
        chosen: list[WorkerSupply] = []
        for _ in range(min(cap, len(eligible))):
            rest = [w for w in eligible if w not in chosen]
            chosen.append(max(rest, key=lambda w: (-_violation(after([*chosen, w]), config),
                                                   goodput(after([*chosen, w])))))
            candidates.append(tuple(chosen))
    choice: tuple[WorkerSupply, ...] = ()
    best: tuple[int, float, int] | None = None
    for moves in candidates:
        if not moves:
            continue
        roles = after(moves)
        rank = (_violation(roles, config), goodput(roles), len(moves))
        if rank[0] > current_violation or (rank[0] == current_violation and rank[1] < current_goodput * (1 - _TIE)):
            continue  # never worse than now
        if best is None or rank[0] < best[0] or (rank[0] == best[0] and (
                rank[1] > best[1] * (1 + _TIE) + 1e-12
                or (rank[1] >= best[1] * (1 - _TIE) and rank[2] > best[2]))):
            choice, best = moves, rank
    return choice


def plan_roles(shape: ModelShape, slo: Slo, demand: Demand, workers: Sequence[WorkerSupply], *, now_s: float,
               config: PlannerConfig = DEFAULT_CONFIG, cost: CostModel | None = None,
               gpu_blind: bool = False) -> Plan:
    """One planning round for one model's workers (module docstring). Deterministic for equal inputs."""
    ids = [w.worker_id for w in workers]
    if len(set(ids)) != len(ids):
        raise ValueError("worker ids must be unique")
    cost = cost if cost is not None else CostModel()
    view = list(workers)
    if gpu_blind:
        cost, view = _blind(cost, view)
    original = {w.worker_id: w for w in workers}
    predictor = Predictor(shape, slo, demand, cost)
    current_roles = {w.worker_id: w.role for w in view}

    def estimate(roles: Mapping[str, str]) -> GoodputEstimate:
        return predictor.estimate(*split_roles(view, roles))

    def goodput(roles: Mapping[str, str]) -> float:
        return predictor.goodput(*split_roles(view, roles))

    current = estimate(current_roles)
    current_violation = _violation(current_roles, config)
    if not demand.known and current_violation == 0:
        line = f"{saw(demand)}; no demand to plan for: keeping every role (no gain to predict)"
        return Plan(current_roles, (), current, current, current, dict(current_roles), line, ())

    fixed, classes = classes_of(view)
    search = Search(predictor, fixed, classes, config)
    best_roles = _best_assignment(view, search, search.best())
    best = estimate(best_roles)
    wanted = sorted((w for w in view if best_roles[w.worker_id] != w.role), key=longest_in_role_first)
    dwelling = {w.worker_id for w in view if w.switchable and now_s - w.role_since_s < config.min_dwell_s}
    held = [f"{w.worker_id}: dwell {now_s - w.role_since_s:.0f} s < {config.min_dwell_s:.0f} s"
            for w in wanted if w.worker_id in dwelling]
    eligible, target_roles = wanted, best_roles
    if held:
        # The best the workers free to move can reach: another class may stand in for a dwelling worker.
        pinned = [replace(w, switchable=False) if w.worker_id in dwelling else w for w in view]
        fixed, classes = classes_of(pinned)
        reachable = Search(predictor, fixed, classes, config)
        target_roles = _best_assignment(pinned, reachable, reachable.best())
        eligible = sorted((w for w in view if target_roles[w.worker_id] != w.role), key=longest_in_role_first)

    def after(moves: Sequence[WorkerSupply]) -> dict[str, str]:
        roles = dict(current_roles)
        for w in moves:
            roles[w.worker_id] = _flip(w.role)
        return roles

    base_goodput = current.goodput_rps
    target_goodput = goodput(target_roles)
    choice: tuple[WorkerSupply, ...] = ()
    hold_reason = "the current assignment is the best predicted"
    if not eligible:
        if wanted:
            hold_reason = "wanted moves held: " + "; ".join(held)
    elif _violation(target_roles, config) >= current_violation and not (
            target_goodput > base_goodput and (target_goodput >= base_goodput * (1 + config.min_gain)
                                               or (demand.misses(slo) and base_goodput < demand.arrival_rps))):
        hold_reason = (f"best reachable {target_goodput:.3g} req/s is less than {config.min_gain:.0%} above"
                       f" current {base_goodput:.3g} req/s")
        held.append(f"hysteresis: {hold_reason}")
    else:
        choice = _step(eligible, config, current_violation, base_goodput, after, goodput)
        cap = max(0, config.max_switches)
        for w in eligible:
            if w in choice:
                continue
            if len(choice) >= cap:
                held.append(f"{w.worker_id}: at most {cap} switch{'es' if cap != 1 else ''} per round")
            else:
                held.append(f"{w.worker_id}: moving it now would lower goodput")
        if not choice:
            hold_reason = "no move toward the best assignment keeps goodput: " + "; ".join(held)
    planned_roles = after(choice)
    planned = estimate(planned_roles) if choice else current

    changes = []
    for w in choice:
        twins = [t for t in view if t.switchable and (t.gpu_type, t.gpu_count, t.kv_capacity_tokens, t.max_batch_size)
                 == (w.gpu_type, w.gpu_count, w.kv_capacity_tokens, w.max_batch_size)]
        longest = any(t.role == w.role and t not in choice for t in twins)
        why = change_why(predictor, view, w, _flip(w.role), current, longest)
        changes.append(Change(w.worker_id, w.role, _flip(w.role), why))
    line = explanation(demand, slo, current, planned, [(original[w.worker_id], _flip(w.role)) for w in choice],
                       hold_reason)
    return Plan(planned_roles, tuple(changes), current, planned, best, best_roles, line, tuple(held))

