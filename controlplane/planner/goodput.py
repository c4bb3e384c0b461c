"""Predicted goodput of a prefill/decode role assignment, priced with the router's cost model. Pure.

Every time below comes from router_svc.costmodel.CostModel (the calibrated
step model of runtime/stepmodel.py), so the planner and the router agree on
which GPU is faster at what; nothing here knows GPU names.

Prefill side: a worker's service time is the cost model's prefill time of
the mean prompt on its GPUs. The router sends each request to the worker
with the least expected time, which keeps the pool close to one shared queue
of heterogeneous servers, so the pool is an M/D/c queue with c workers and
the harmonic-mean service time (its total rate is the sum of the workers'
rates), and each worker takes a share of the requests proportional to its
speed. The wait follows the usual exponential-tail approximation of M/G/c
(Allen-Cunneen with deterministic service, squared coefficient 0):

    P(wait > t) = C(c, a) * exp(-2 (1 - rho) c t / s_mean)

with C the Erlang-C probability of waiting, a = lambda * s_mean, rho = a / c.
A request's TTFT is its wait plus the prefill of a p90 prompt on the worker
that serves it plus the KV transfer of that prompt (cost.kv_transfer_s,
between hosts): p90 TTFT solves sum_i share_i * P(TTFT_i > T) = 0.1. A
worker too slow to meet the target even idle would only hurt the tail, and
the router would leave it idle, so the pool is evaluated on the k fastest
workers for every k and the best k counts. Prefill capacity is the highest
arrival rate whose p90 TTFT meets the target (bisection; the tail grows
with the rate).

Decode side: each worker runs continuous batching. A step of B sequences at
the mean context (prompt + output / 2) takes the cost model's step time; the
largest B whose step meets the inter-token target, whose KV fits (B x
(prompt + output) tokens, the whole length an engine reserves) and that the
batch limit allows is the worker's sustainable concurrency, and by Little's
law it serves B / (output tokens x step time) requests/s. (Demand's
output p90 is not used: the decode side is a rate, where the mean counts.) Decode capacity is
the sum over decode workers. A worker's KV capacity, when not reported, is
90 % of its GPU memory less the weights and 2 GB per GPU for activations
(the sim engine's defaults).

Goodput = min(arrival rate, prefill capacity, decode capacity); the smaller
capacity, when it binds, is the bottleneck. No prefill or no decode worker
serves nothing.

What it leaves out, both of which the fleet simulator shows: the router's
local prefill on decode workers (short prompts, saturated prefill queues),
which lets a prefill-starved split serve more than predicted; and the
collapse of an overloaded pool without admission control, where queues grow
and nearly every request misses, which the min() above does not charge. The
assignment it ranks best is the one with the most capacity where demand
needs it, which is what the planner asks of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controlplane.planner.types import DECODE, PREFILL, Demand, GoodputEstimate, Slo, WorkerSupply
from router_svc.candidates import Candidate, Role, make_candidate
from router_svc.costmodel import CostModel, ModelShape

__all__ = ["DEFAULT_MAX_BATCH", "Predictor", "WorkerFigures", "predict_goodput"]

DEFAULT_MAX_BATCH = 256
# The sim engine's memory defaults (engine/sim/roofline.py RooflineParams).
MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_BYTES_PER_GPU = 2e9
TAIL = 0.1  # p90
_BISECTIONS = 40


@dataclass(frozen=True)
class WorkerFigures:
    """What one worker would do in either role at the demand (the same for identical workers)."""

    candidate: Candidate
    prefill_s: float         # service time of a mean prompt (inf: the model does not fit)
    ttft_floor_s: float      # p90 prompt's prefill plus its KV transfer: the TTFT of an idle pool
    concurrency: int         # decode sequences within the inter-token target, KV and batch limit
    decode_step_s: float     # step time at that concurrency
    decode_rps: float        # requests/s at that concurrency (Little's law)
    full_batch: int          # sequences an overloaded worker holds (KV and batch limit only)


# A group of identical prefill workers: (service s, TTFT floor, count).
Group = tuple[float, float, int]


def _erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in M/M/c (stable recursion through Erlang B)."""
    if offered <= 0:
        return 0.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    return servers * b / (servers - offered * (1.0 - b))


class _PrefillPool:
    """One set of prefill workers serving as one M/D/c queue (module docstring)."""

    def __init__(self, groups: Sequence[Group]) -> None:
        self.groups = [(s, d, n) for s, d, n in groups if n > 0 and math.isfinite(s) and s > 0]
        self.servers = sum(n for _, _, n in self.groups)
        self.rate = sum(n / s for s, _, n in self.groups)
        self.mean_s = self.servers / self.rate if self.rate > 0 else math.inf

    def tail(self, arrival: float, t: float) -> float:
        """P(TTFT > t) at `arrival` requests/s."""
        if self.servers == 0 or arrival >= self.rate:
            return 1.0
        offered = arrival * self.mean_s
        waits = _erlang_c(self.servers, offered)
        decay = 2.0 * (1.0 - offered / self.servers) * self.servers / self.mean_s
        total = 0.0
        for s, floor, n in self.groups:
            share = n / s / self.rate
            total += share if t < floor else share * waits * math.exp(-decay * (t - floor))
        return total

    def p90(self, arrival: float) -> float:
        if self.servers == 0 or arrival >= self.rate:
            return math.inf
        lo = min(d for _, d, _ in self.groups)
        hi = max(d for _, d, _ in self.groups)
        step = max(self.mean_s, 1e-6)
        while self.tail(arrival, hi) > TAIL:
            hi += step
            step *= 2
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.tail(arrival, mid) > TAIL else (lo, mid)
        return hi

    def capacity(self, ttft_s: float) -> float:
        if self.servers == 0 or self.tail(0.0, ttft_s) > TAIL:
            return 0.0
        lo, hi = 0.0, self.rate
        for _ in range(_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.tail(mid, ttft_s) <= TAIL else (lo, mid)
        return lo


def _prefixes(groups: Iterable[Group]) -> list[_PrefillPool]:
    """The pools of the k fastest groups, k = 1..n (fastest: lowest TTFT floor)."""
    ordered = sorted((g for g in groups if g[2] > 0 and math.isfinite(g[0])), key=lambda g: (g[1], g[0]))
    return [_PrefillPool(ordered[:k]) for k in range(1, len(ordered) + 1)]


def prefill_capacity(groups: Iterable[Group], ttft_s: float) -> float:
    """Highest arrival rate the groups serve within the p90 TTFT target."""
    return max((pool.capacity(ttft_s) for pool in _prefixes(groups)), default=0.0)


def prefill_p90(groups: Iterable[Group], arrival: float) -> float:
    """Predicted p90 TTFT at `arrival` (inf when the pool cannot keep up)."""
    return min((pool.p90(arrival) for pool in _prefixes(groups)), default=math.inf)


class Predictor:
    """Prices workers at one (shape, SLO, demand) with one cost model; caches per kind of worker."""

    def __init__(self, shape: ModelShape, slo: Slo, demand: Demand, cost: CostModel | None = None) -> None:
        self.shape, self.slo, self.demand = shape, slo, demand
        self.cost = cost if cost is not None else CostModel()
        self.context = demand.prompt_tokens + demand.output_tokens / 2
        self._figures: dict[tuple[str, int, int, int], WorkerFigures] = {}

    def figures(self, worker: WorkerSupply) -> WorkerFigures:
        key = (worker.gpu_type, worker.gpu_count, worker.kv_capacity_tokens, worker.max_batch_size)
        found = self._figures.get(key)
        if found is None:
            found = self._figures[key] = self._price(worker)
        return found

    def kv_tokens(self, worker: WorkerSupply) -> float:
        """KV tokens the worker holds: reported, or derived from its GPU memory and the shape."""
        if worker.kv_capacity_tokens > 0:
            return float(worker.kv_capacity_tokens)
        count = max(1, worker.gpu_count)
        free = (self.cost.gpu(worker.gpu_type).memory_bytes * count * MEMORY_UTILIZATION
                - self.shape.weight_bytes - ACTIVATION_RESERVE_BYTES_PER_GPU * count)
        if free <= 0:
            return 0.0
        return math.inf if self.shape.kv_bytes_per_token <= 0 else free / self.shape.kv_bytes_per_token

    def step_s(self, figures: WorkerFigures, batch: float) -> float:
        """Decode step of `batch` sequences at the demand's mean context."""
        whole = max(1, math.ceil(batch))
        return self.cost.step_s(figures.candidate, self.shape, whole, whole * self.context)

    def _price(self, worker: WorkerSupply) -> WorkerFigures:
        demand, cost, shape = self.demand, self.cost, self.shape
        cand = make_candidate(worker_id=worker.worker_id, role=Role.DECODE, model="", endpoint="",
                              gpu_type=worker.gpu_type, gpu_count=max(1, worker.gpu_count),
                              max_batch_size=worker.max_batch_size, shape=shape)
        kv = self.kv_tokens(worker)
        if kv <= 0 or demand.prompt_tokens <= 0 or demand.output_tokens <= 0:
            return WorkerFigures(cand, math.inf, math.inf, 0, math.inf, 0.0, 0)
        prefill = cost.prefill_s(cand, max(1, round(demand.prompt_tokens)), shape)
        p90_prompt = max(1, round(demand.prompt_p90))
        floor = cost.prefill_s(cand, p90_prompt, shape) + cost.kv_transfer_s(p90_prompt, shape, same_host=False)
        limit = worker.max_batch_size or DEFAULT_MAX_BATCH
        per_sequence = demand.prompt_tokens + demand.output_tokens
        full = int(min(limit, kv // per_sequence)) if math.isfinite(kv) else limit
        partial = WorkerFigures(cand, prefill, floor, 0, math.inf, 0.0, full)
        # Largest batch within the inter-token target: the step grows with the batch.
        lo, hi = 0, full
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.step_s(partial, mid) <= self.slo.inter_token_s else (lo, mid - 1)
        if lo == 0:
            return partial
        step = self.step_s(partial, lo)
        return WorkerFigures(cand, prefill, floor, lo, step, lo / (demand.output_tokens * step), full)

    def groups(self, workers: Iterable[WorkerSupply]) -> list[Group]:
        counted: dict[tuple[float, float], int] = {}
        for w in workers:
            f = self.figures(w)
            counted[(f.prefill_s, f.ttft_floor_s)] = counted.get((f.prefill_s, f.ttft_floor_s), 0) + 1
        return [(s, d, n) for (s, d), n in counted.items()]

    def decode_inter_token_s(self, decoders: Sequence[WorkerSupply], arrival: float, capacity: float) -> float:
        """Slowest decode worker's step at `arrival`, load split in proportion to capacity."""
        worst = 0.0
        for w in decoders:
            f = self.figures(w)
            if arrival > capacity or f.decode_rps <= 0:
                worst = max(worst, self.step_s(f, max(1, f.full_batch)) if f.full_batch else math.inf)
                continue
            share = arrival * f.decode_rps / capacity
            batch = 1.0
            for _ in range(30):  # B = share x output x step(B): rises to the least fixed point
                batch = min(float(f.concurrency), max(1.0, share * self.demand.output_tokens * self.step_s(f, batch)))
            worst = max(worst, self.step_s(f, batch))
        return worst

    def goodput(self, prefillers: Sequence[WorkerSupply], decoders: Sequence[WorkerSupply]) -> float:
        """estimate(...).goodput_rps without the latency figures."""
        if not prefillers or not decoders or self.demand.arrival_rps <= 0:
            return 0.0
        d_cap = sum(self.figures(w).decode_rps for w in decoders)
        return min(self.demand.arrival_rps, d_cap, prefill_capacity(self.groups(prefillers), self.slo.ttft_s))

    def estimate(self, prefillers: Sequence[WorkerSupply], decoders: Sequence[WorkerSupply]) -> GoodputEstimate:
        demand = self.demand
        groups = self.groups(prefillers)
        p_cap = prefill_capacity(groups, self.slo.ttft_s) if decoders or prefillers else 0.0
        d_cap = sum(self.figures(w).decode_rps for w in decoders)
        arrival = max(0.0, demand.arrival_rps)
        if not prefillers or not decoders:
            p_cap = p_cap if prefillers else 0.0
            bottleneck = PREFILL if not prefillers else DECODE
            return GoodputEstimate(0.0, p_cap, d_cap, math.inf, math.inf, bottleneck if arrival > 0 else "none")
        goodput = min(arrival, p_cap, d_cap)
        if arrival <= min(p_cap, d_cap):
            bottleneck = "none"
        else:
            bottleneck = PREFILL if p_cap <= d_cap else DECODE
        ttft = prefill_p90(groups, arrival) if arrival > 0 else 0.0
        itl = self.decode_inter_token_s(decoders, arrival, d_cap) if arrival > 0 else 0.0
        return GoodputEstimate(goodput, p_cap, d_cap, ttft, itl, bottleneck)


def split_roles(workers: Iterable[WorkerSupply],
                roles: Mapping[str, str] | None) -> tuple[list[WorkerSupply], list[WorkerSupply]]:
    """(prefill workers, decode workers) under `roles` (worker_id -> role; missing: the worker's own)."""
    prefill: list[WorkerSupply] = []
    decode: list[WorkerSupply] = []
    for w in workers:
        role = roles.get(w.worker_id, w.role) if roles is not None else w.role
        if role not in (PREFILL, DECODE):
            raise ValueError(f"worker {w.worker_id}: role must be 'prefill' or 'decode', got {role!r}")
        (prefill if role == PREFILL else decode).append(w)
    return prefill, decode


def predict_goodput(shape: ModelShape, slo: Slo, demand: Demand, workers: Sequence[WorkerSupply],
                    roles: Mapping[str, str] | None = None, cost: CostModel | None = None) -> GoodputEstimate:
    """Goodput of `workers` under `roles` (worker_id -> role overriding WorkerSupply.role; None: as they are)."""
    prefill, decode = split_roles(workers, roles)
    return Predictor(shape, slo, demand, cost).estimate(prefill, decode)
