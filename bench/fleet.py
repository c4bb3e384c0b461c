"""Simulated fleets: goodput of aggregated vs disaggregated serving, and of mixed GPUs at equal hourly cost.

    .venv/bin/python bench/fleet.py [--quick] [--prices FILE] [--requests N] [--seed 1] [--weights bf16|fp8]
        [--timing calibrated|roofline] [--input 3000] [--output 150] [--ttft-slo 2] [--tpot-slo 0.05]

Llama-3-70B on simulated GPUs, timed by the sim engine's step model (by
default the calibrated one of docs/costmodel.md, fitted to published
measurements; --timing roofline for the plain max(FLOPs, bytes) roofline)
and scheduled by its own scheduler, routed by the router's expected-time
policy pricing work with the same step model, on a virtual clock
(bench/_fleet_sim.py): minutes of fleet time cost seconds.

For each fleet, arrival rates are searched for goodput: the highest Poisson
rate at which at least 90% of requests meet both SLOs (TTFT <= 2 s, mean
inter-token time <= 50 ms), as DistServe defines it. Figures per GPU and
per dollar-hour follow.

a. 8 x H100-SXM: aggregated (every worker prefills and decodes; chunk sizes
   tried) against disaggregated with each prefill:decode split that fits.
   70B bf16 weights (141 GB) need tensor parallelism: a worker spans 2, 4 or
   8 GPUs, and only shapes whose KV cache is big enough are tried.
   Published anchor: Dynamo reports +30% throughput per GPU on one node.
b. At equal hourly cost (runtime/data/prices.toml, or --prices): H100
   prefill + A100-80GB decode against all-H100 and all-A100 (best shape of
   each). Published anchor: Splitwise, up to 1.4x throughput at 20% lower cost.

Prints the model's assumptions next to the results, what a real GPU run must
confirm, and, last, the ratios. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, percentile, print_header, table
from _fleet_sim import FleetSim, WorkerSpec, Workload, poisson_arrivals

from engine.sim import ModelProfile, RooflineParams, get_profile, gpu_set, kv_capacity_blocks, prefill_seconds
from router_svc.candidates import Role
from router_svc.costmodel import CostConfig, CostModel
from router_svc.policies import create_policy
from router_svc.policy import PolicyConfig
from runtime.stepparams import StepParamsTable, default_step_params

PRICES = ROOT / "runtime" / "data" / "prices.toml"
MODEL = "llama-3-70b"
# Tensor-parallel degrees tried; TP1 joins with --weights fp8 (70 GB of weights fit one 80 GB GPU).
TPS = [2, 4, 8]
# Weight bytes per parameter: 2 (bf16) or 1 (fp8; compute is still charged at the bf16 rate).
WEIGHT_BYTES = 2.0


def model_profile() -> ModelProfile:
    """The simulated model, with the weight precision chosen by --weights."""
    return dataclasses.replace(get_profile(MODEL), dense_weight_bytes=WEIGHT_BYTES)
# KV moved between workers: NVLink/NVSwitch inside a node (NIXL-class
# transfer), one 200 Gb/s-class RDMA path between nodes.
SAME_HOST_KV = 100e9
CROSS_HOST_KV = 25e9
# One global memory setting: 95% of GPU memory for weights + KV (vLLM's
# gpu_memory_utilization; 0.9 leaves no KV room for 70B bf16 on 2 x 80 GB).
PARAMS = RooflineParams.create(memory_utilization=0.95)
# What the router prices work with: the same calibrated parameters as the
# sim (replaced under --timing roofline by the roofline's efficiencies, MFU
# 0.5 and MBU 0.7 times TP efficiency 0.9, with no overhead or interference).
ROUTER_PARAMS: StepParamsTable = default_step_params()
ROOFLINE_ROUTER_PARAMS = StepParamsTable(reference_engine="roofline", interference=0.0, allreduce_s=0.0,
                                         overheads={"roofline": 0.0}, efficiencies={"default": (0.45, 0.63)})


@dataclass(frozen=True)
class Price:
    usd_per_gpu_hour: float
    source: str
    date: str


def load_prices(path: Path) -> dict[str, Price]:
    """GPU id -> Price; ValueError names the file, GPU and field of a bad entry."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read prices from {path}: {exc}") from None
    prices = {}
    for gpu, row in (data.get("gpus") or {}).items():
        value = row.get("usd_per_gpu_hour")
        if not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{path}: gpus.{gpu}.usd_per_gpu_hour must be a number > 0, got {value!r}")
        for key in ("source", "date"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{path}: gpus.{gpu}.{key} must be a non-empty string")
        prices[gpu] = Price(float(value), row["source"], row["date"])
    return prices


@dataclass(frozen=True)
class Pool:
    role: Role
    gpu_type: str
    tp: int
    workers: int


@dataclass(frozen=True)
class Fleet:
    name: str
    pools: tuple[Pool, ...]
    chunk: int = 8192

    @property
    def gpus(self) -> int:
        return sum(p.tp * p.workers for p in self.pools)

    def cost(self, prices: dict[str, Price]) -> float:
        return sum(p.tp * p.workers * prices[p.gpu_type].usd_per_gpu_hour for p in self.pools)

    def specs(self) -> list[WorkerSpec]:
        out = []
        for pool in self.pools:
            for i in range(pool.workers):
                # Workers of one GPU type share a node (NVLink); different types are different machines.
                out.append(WorkerSpec(f"{pool.role.value}-{pool.gpu_type}-{i}", pool.role,
                                      gpu_set(pool.gpu_type, pool.tp), host=pool.gpu_type, max_step_tokens=self.chunk))
        return out


def _fits(role: Role, gpu_type: str, tp: int, workload: Workload) -> bool:
    """Prefill workers need room for two prompts; decoding ones for 16 whole requests."""
    try:
        blocks = kv_capacity_blocks(gpu_set(gpu_type, tp), model_profile(), 16, PARAMS)
    except Exception:
        return False
    need = 2 * workload.input_tokens if role is Role.PREFILL else 16 * (workload.input_tokens + workload.output_tokens)
    return blocks * 16 >= need


def fleets(prefill_gpu: str, decode_gpu: str, gpus: int, workload: Workload, chunks: tuple[int, ...],
           *, exact: bool = True, aggregated: bool = True) -> list[Fleet]:
    """Every aggregated and disaggregated shape over `gpus` GPUs (at most, unless `exact`) that fits."""
    out = []
    if aggregated and prefill_gpu == decode_gpu:
        for tp in TPS:
            if gpus % tp == 0 and _fits(Role.DECODE, decode_gpu, tp, workload):
                for chunk in chunks:
                    out.append(Fleet(f"agg {gpus // tp}x TP{tp} {decode_gpu}, chunk {chunk}",
                                     (Pool(Role.DECODE, decode_gpu, tp, gpus // tp),), chunk))
    for ptp in TPS:
        for dtp in TPS:
            if not (_fits(Role.PREFILL, prefill_gpu, ptp, workload) and _fits(Role.DECODE, decode_gpu, dtp, workload)):
                continue
            for a in range(1, gpus // ptp + 1):
                for b in range(1, (gpus - a * ptp) // dtp + 1):
                    used = a * ptp + b * dtp
                    if used == gpus or (not exact and used <= gpus):
                        out.append(Fleet(f"disagg {a}P TP{ptp} {prefill_gpu} + {b}D TP{dtp} {decode_gpu}",
                                         (Pool(Role.PREFILL, prefill_gpu, ptp, a),
                                          Pool(Role.DECODE, decode_gpu, dtp, b))))
    return out


@dataclass
class Result:
    fleet: Fleet
    goodput: float
    ttft_p90: float
    tpot_p90: float
    runs: int


def _run(fleet: Fleet, rate: float, workload: Workload, requests: int, seed: int) -> tuple[float, float, float]:
    import random

    profile = model_profile()
    policy = create_policy("expected-time", cost=CostModel(config=CostConfig(
        same_host_kv_bytes_per_s=SAME_HOST_KV, cross_host_kv_bytes_per_s=CROSS_HOST_KV), params=ROUTER_PARAMS),
        # The simulator hands the policy exact loads at every decision: nothing to hold in flight.
        config=PolicyConfig(inflight_hold_s=0))
    sim = FleetSim(fleet.specs(), profile, PARAMS, policy, workload, same_host_kv_bytes_per_s=SAME_HOST_KV,
                   cross_host_kv_bytes_per_s=CROSS_HOST_KV)
    arrivals = poisson_arrivals(requests, rate, seed)
    judge = range(requests // 10, requests - requests // 10)
    met = sim.run(arrivals, random.Random(seed), judge=judge, horizon_s=arrivals[-1] + 120)
    ttft = [r.first_at - r.arrival for r in (sim.records[i] for i in judge) if r.first_at is not None]
    tpot = [(r.last_at - r.first_at) / (r.tokens - 1) for r in (sim.records[i] for i in judge)
            if r.done and r.first_at is not None and r.last_at is not None and r.tokens > 1]
    return met, percentile(ttft, 90), percentile(tpot, 90)


def goodput(fleet: Fleet, workload: Workload, requests: int, seed: int, steps: int) -> Result:
    """The highest rate (req/s) meeting the attainment target: geometric bracket, then bisection."""
    profile = model_profile()
    capacity = 0.0
    for pool in fleet.pools:
        if pool.role is not Role.DECODE or len(fleet.pools) == 1:
            capacity += pool.workers / prefill_seconds(gpu_set(pool.gpu_type, pool.tp), profile,
                                                       workload.input_tokens, 0, PARAMS)
    runs = 0
    best = (0.0, float("nan"), float("nan"))

    def ok(rate: float) -> bool:
        nonlocal runs, best
        runs += 1
        met, ttft, tpot = _run(fleet, rate, workload, requests, seed)
        if met >= workload.attainment and rate > best[0]:
            best = (rate, ttft, tpot)
        return met >= workload.attainment

    lo, hi = 0.0, 0.6 * capacity
    while ok(hi):
        lo, hi = hi, hi * 1.3
    if lo == 0.0:
        hi_fail = hi
        probe = hi / 1.5
        while probe > capacity * 0.01 and not ok(probe):
            hi_fail, probe = probe, probe / 1.5
        lo, hi = (probe, hi_fail) if probe > capacity * 0.01 else (0.0, probe)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return Result(fleet, best[0], best[1], best[2], runs)


def _rows(results: list[Result], prices: dict[str, Price]) -> list[list[str]]:
    rows = []
    for r in results:
        cost = r.fleet.cost(prices)
        rows.append([r.fleet.name, str(r.fleet.gpus), f"{cost:.2f}", f"{r.goodput:.2f}",
                     f"{r.goodput / r.fleet.gpus:.3f}", f"{r.goodput * 3600 / cost:.0f}",
                     f"{r.ttft_p90:.2f}", f"{r.tpot_p90 * 1000:.1f}", str(r.runs)])
    return rows


HEADERS = ["fleet", "GPUs", "$/h", "goodput req/s", "req/s/GPU", "req per $", "TTFT p90 s", "TPOT p90 ms", "runs"]


def _per_gpu(r: Result) -> float:
    return r.goodput / r.fleet.gpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per run, fewer shapes, coarser search")
    parser.add_argument("--prices", type=Path, default=PRICES, help=f"GPU price file (default {PRICES})")
    parser.add_argument("--requests", type=int, default=0, help="requests per simulated run (default 500; quick 250)")
    parser.add_argument("--seed", type=int, default=1, help="arrival and length seed (the same for every fleet)")
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                        help="weight precision: fp8 halves weight bytes, so 1-GPU prefill workers and more "
                             "prefill:decode splits fit; matmuls run at the GPU's FP8 rate where it has one")
    parser.add_argument("--timing", choices=("calibrated", "roofline"), default="calibrated",
                        help="step timing: the calibrated step model (docs/costmodel.md) or the plain roofline")
    parser.add_argument("--input", type=int, default=3000, help="mean prompt tokens (default 3000)")
    parser.add_argument("--output", type=int, default=150, help="mean output tokens (default 150)")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT SLO in seconds (default 2)")
    parser.add_argument("--tpot-slo", type=float, default=0.05, help="mean inter-token SLO in seconds (default 0.05)")
    parser.add_argument("--h100-only", action="store_true", help="only part a (8 x H100: aggregated vs disaggregated)")
    args = parser.parse_args()
    global WEIGHT_BYTES, PARAMS, ROUTER_PARAMS
    if args.weights == "fp8":
        WEIGHT_BYTES = 1.0
        TPS.insert(0, 1)
    if args.timing == "roofline":
        PARAMS = dataclasses.replace(PARAMS, timing="roofline")
        ROUTER_PARAMS = ROOFLINE_ROUTER_PARAMS
    requests = args.requests or (250 if args.quick else 500)
    steps = 3 if args.quick else 5
    chunks = (2048,) if args.quick else (8192, 2048)
    try:
        prices = load_prices(args.prices)
    except ValueError as exc:
        sys.exit(f"fleet.py: {exc}")
    for gpu in ("H100-SXM", "A100-80GB"):
        if gpu not in prices:
            sys.exit(f"fleet.py: {args.prices} has no price for {gpu}")
    workload = Workload(input_tokens=args.input, output_tokens=args.output, ttft_slo_s=args.ttft_slo,
                        tpot_slo_s=args.tpot_slo)
    profile = model_profile()
    started = time.monotonic()

    print_header(f"fleet goodput: {MODEL} ({args.weights} weights) on simulated GPUs, {args.timing} timing, "
                 f"{requests} requests per run, seed {args.seed}")
    print("assumptions:")
    if args.timing == "calibrated":
        fitted = default_step_params()
        timing_lines = [
            "step = overhead + TP all-reduces + max(compute, memory) + interference x min(compute, memory), "
            "fitted to published measurements (docs/costmodel.md, bench/calibrate_costmodel.py)",
            *(f"{g}: {fitted.for_gpu(g)}" + ("" if fitted.fitted(g) else " (no published rows: unvalidated)")
              for g in ("H100-SXM", "A100-80GB")),
            f"interference {fitted.interference:.2f}: a decode batch sharing a step with a compute-bound prefill "
            "chunk pays that share of its memory time (0 would be the roofline's free ride)",
        ]
    else:
        timing_lines = ["every step is max(FLOPs / compute, bytes / bandwidth); no per-step overhead, TP efficiency "
                        "0.9 whatever the degree, decode tokens ride free on a compute-bound prefill chunk"]
    for line in [profile.describe(), workload.describe(), *PARAMS.describe(), *timing_lines,
                 f"a worker spans {', '.join(map(str, TPS))} GPUs (tensor parallel); shapes with KV room for fewer "
                 "than 16 requests (decoding) or 2 prompts (prefill) are skipped",
                 "scheduling: the sim engine's (continuous batching, max 256 sequences, one prompt per step, "
                 "chunked prefill at 'chunk' tokens per step, preemption on KV exhaustion)",
                 "routing: the router's expected-time policy over live loads (no report delay); prompts > 256 tokens "
                 "are disaggregated when a prefill worker has room",
                 f"KV transfer: {SAME_HOST_KV / 1e9:g} GB/s within a node, {CROSS_HOST_KV / 1e9:g} GB/s between "
                 "nodes, no contention; TTFT counts to the prefill's first token",
                 "prices: " + "; ".join(f"{g} ${p.usd_per_gpu_hour}/GPU-h ({p.source}, {p.date})"
                                        for g, p in sorted(prices.items()) if g in ("H100-SXM", "A100-80GB"))]:
        print(f"  - {line}")

    def search(options: list[Fleet]) -> list[Result]:
        out = []
        for fleet in options:
            out.append(goodput(fleet, workload, requests, args.seed, steps))
            print(f"  {fleet.name}: {out[-1].goodput:.2f} req/s ({time.monotonic() - started:.0f} s)",
                  file=sys.stderr, flush=True)
        return out

    h100 = search(fleets("H100-SXM", "H100-SXM", 8, workload, chunks))
    a100 = [] if args.h100_only else search(fleets("A100-80GB", "A100-80GB", 8, workload, chunks))
    mixed = [] if args.h100_only else search(fleets("H100-SXM", "A100-80GB", 8, workload, chunks, exact=False))

    print("\na. 8 x H100-SXM, aggregated vs disaggregated")
    print(table(HEADERS, _rows(h100, prices)))
    if not args.h100_only:
        print("\nb. H100 prefill + A100 decode vs all-H100 and all-A100, per dollar-hour")
        print(table(HEADERS, _rows(a100 + mixed, prices)))
    print("\nwhat a real GPU run must confirm: the fitted step parameters on bf16 weights (the published rows are "
          "FP8), A100 (no published rows: its parameters are the fitted types' mean), TP4/TP8 all-reduce cost "
          "(published rows reach TP2), KV transfer rate and its overlap with decode "
          "(bench/gpu/measure_steps.py writes step rows to refit with)")
    print(f"(simulated in {time.monotonic() - started:.0f} s of CPU time)")

    print()
    agg = max((r for r in h100 if r.fleet.name.startswith("agg")), key=_per_gpu)
    dis = max((r for r in h100 if r.fleet.name.startswith("disagg")), key=_per_gpu)
    print(f"a. disaggregated / aggregated goodput per GPU (8 x H100): {_per_gpu(dis) / _per_gpu(agg):.2f}x "
          f"({dis.fleet.name} vs {agg.fleet.name}); Dynamo reports 1.30x")

    if args.h100_only:
        return

    def per_dollar(r: Result) -> float:
        return r.goodput / r.fleet.cost(prices)

    best_h, best_a, best_m = (max(rs, key=per_dollar) for rs in (h100, a100, mixed))
    dis_h, dis_a = (max((r for r in rs if r.fleet.name.startswith("disagg")), key=per_dollar) for rs in (h100, a100))
    for label, base in (("all-H100", best_h), ("all-A100", best_a), ("all-H100 disaggregated", dis_h),
                        ("all-A100 disaggregated", dis_a)):
        print(f"b. mixed / {label} goodput at equal hourly cost: {per_dollar(best_m) / per_dollar(base):.2f}x "
              f"({best_m.fleet.name} vs {base.fleet.name}); Splitwise reports up to 1.4x throughput at 0.8x cost")
    _break_even(best_m, best_h, prices)


def _break_even(mixed: Result, h100: Result, prices: dict[str, Price]) -> None:
    """The H100:A100 price ratio above which the mixed fleet beats all-H100 per dollar."""
    n_h = sum(p.tp * p.workers for p in mixed.fleet.pools if p.gpu_type == "H100-SXM")
    n_a = mixed.fleet.gpus - n_h
    g_m, g_h = mixed.goodput, h100.goodput / h100.fleet.gpus
    # mixed/(n_h k + n_a) > g_h/k  <=>  k (g_m - n_h g_h) > n_a g_h
    ratio = prices["H100-SXM"].usd_per_gpu_hour / prices["A100-80GB"].usd_per_gpu_hour
    if g_m - n_h * g_h <= 0:
        print(f"b. the mixed fleet does not beat all-H100 per dollar at any price ratio (now {ratio:.2f})")
    else:
        print(f"b. mixed beats all-H100 per dollar when H100/A100 price > {n_a * g_h / (g_m - n_h * g_h):.2f} "
              f"(these prices: {ratio:.2f})")


if __name__ == "__main__":
    main()
