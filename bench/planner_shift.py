"""The role planner on a shifting workload: planner enacting live switches vs every static split vs aggregated.

    .venv/bin/python bench/planner_shift.py [--quick] [--json PATH] [--seed 1] [--jobs 2] [--scale 1]
        [--phase-s 180] [--interval-s 15] [--window-s 30] [--fleet mixed|h100|both]

Simulated fleets on a virtual clock (bench/_fleet_sim.py): every worker is
the sim engine's own scheduler charged the calibrated step model, routed by
the router's expected-time policy; Llama-3-8B, one GPU per worker. Fleets:
2 x H100-SXM + 2 x A100-80GB, and 4 x H100-SXM (--scale 2: 4 + 4 and 8,
with twice the arrival rates; CPU time grows about 3x).

The workload shifts through three phases (`SHAPES`: prompt-heavy,
decode-heavy, mixed), each fleet at its own arrival rates (`FLEETS`),
chosen so that the fleet is busy and its best split for each phase meets
the SLO. One request trace (same seed) for every run of a fleet:

- planner enacting: every `--interval-s` of virtual time the harness
  measures demand over the last `--window-s` (arrival rate, mean and p90
  prompt and output tokens of the requests that arrived), calls
  controlplane.planner.plan_roles with each worker's GPU type, role and the
  time it took it, and applies the Plan's changes as live role switches
  (bench/_fleet_sim.py: the worker drains its old role, handing over decode
  streams still running after 30 s); PlannerConfig defaults. It starts from
  the best static split, so what it gains is what switching earns;
- every static split (k prefill workers of each GPU type, at least one
  prefill and one decode worker) for the whole run; the best in hindsight
  (highest goodput over the run) is the baseline;
- aggregated serving (every worker prefills and decodes, chunked prefill).

Goodput at SLO: requests finished with TTFT <= the target and mean
inter-token time over the request (TPOT) <= the target, per second of the
phase they arrived in (requests still unfinished `DRAIN_S` after the last
arrival count as missed). Goal checks printed last: planner / best static
>= 1.3x over the run, and >= 0.9x in every phase.

--quick: 20 s phases and only the static splits that give prefill to the
compute-richest GPUs first (a smoke test: its figures are not the result).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile, print_header, table
from _fleet_sim import HANDOVER_GRACE_S, FleetSim, Phase, Record, WorkerSpec, Workload, model_shape, shifting_trace

from controlplane.planner import Demand, PlannerConfig, Slo, WorkerSupply, plan_roles, predict_goodput
from engine.sim import ModelProfile, RooflineParams, get_profile, gpu_set, kv_capacity_blocks
from router_svc.candidates import Role
from router_svc.costmodel import CostConfig, CostModel
from router_svc.policies import create_policy
from router_svc.policy import PolicyConfig
from runtime.stepparams import default_step_params

MODEL = "llama-3-8b"
H100, A100 = "H100-SXM", "A100-80GB"
# KV moved between workers: NVLink inside a node, a 200 Gb/s-class RDMA path between nodes (as bench/fleet.py).
SAME_HOST_KV = 100e9
CROSS_HOST_KV = 25e9
PARAMS = RooflineParams.create()
SLO = Slo(ttft_s=2.0, inter_token_s=0.05)
# Aggregated workers prefill in chunks this size, so a prompt stalls their decode batch less.
AGGREGATED_CHUNK = 2048
DRAIN_S = 120.0
BLOCK = 16

# Realistic shapes: summarising / RAG over long documents, then long-form generation, then chat. Each fleet
# gets its own arrival rates (FleetSpec.rates_rps), set so that its best split for the phase meets the SLO
# while the fleet is busy; the lengths are the same for both.
# The decode-heavy phase is shorter: at its higher arrival rate it still carries about as many requests as
# each of the others, so no phase dominates the run's goodput.
SHAPES = (
    Phase("prompt-heavy", 180.0, 1.0, (4000, 7500), (32, 128)),
    Phase("decode-heavy", 120.0, 1.0, (200, 600), (512, 1024)),
    Phase("mixed", 180.0, 1.0, (1000, 4000), (128, 512)),
)


@dataclass(frozen=True)
class FleetSpec:
    name: str
    gpus: tuple[tuple[str, int], ...]    # (catalog id, workers of 1 GPU), compute-richest first
    rates_rps: tuple[float, ...]         # per phase of SHAPES

    def scaled(self, factor: int) -> FleetSpec:
        """`factor` times the workers of each type and the arrival rates (the same load per worker)."""
        return FleetSpec(self.name, tuple((g, n * factor) for g, n in self.gpus),
                         tuple(r * factor for r in self.rates_rps))

    @property
    def title(self) -> str:
        return " + ".join(f"{n} x {g}" for g, n in self.gpus)

    def phases(self, duration_s: float = 0.0) -> tuple[Phase, ...]:
        """The phases at this fleet's rates; `duration_s` > 0 sets every phase's length."""
        return tuple(dataclasses.replace(p, rate_rps=r, duration_s=duration_s or p.duration_s)
                     for p, r in zip(SHAPES, self.rates_rps, strict=True))


FLEETS = {
    "mixed": FleetSpec("mixed", ((H100, 2), (A100, 2)), (12.0, 25.0, 17.0)),
    "h100": FleetSpec("h100", ((H100, 4),), (15.0, 38.0, 20.0)),
}

Split = tuple[tuple[str, int], ...]  # (gpu type, prefill workers of that type), in fleet order


@dataclass(frozen=True)
class Job:
    fleet: FleetSpec
    mode: str                # "static" | "aggregated" | "planner"
    phases: tuple[Phase, ...]
    split: Split = ()        # static: the split; planner: the split it starts from
    seed: int = 1
    interval_s: float = 15.0
    window_s: float = 30.0
    planner: PlannerConfig = field(default_factory=PlannerConfig)


@dataclass
class Outcome:
    job: Job
    goodput: list[float]     # per phase, req/s
    overall: float
    attainment: list[float]  # per phase, share of requests meeting the SLO
    ttft_p90: list[float]
    tpot_p90: list[float]
    migrations: int
    switches: list[dict[str, Any]]
    plans: list[str]
    cpu_s: float


def fleet_specs(fleet: FleetSpec, split: Split | None) -> list[WorkerSpec]:
    """One 1-GPU worker per GPU; the first k of each type prefill (None: aggregated, every worker decodes)."""
    prefill = dict(split or ())
    specs = []
    for gpu, count in fleet.gpus:
        for i in range(count):
            role = Role.DECODE if split is None or i >= prefill.get(gpu, 0) else Role.PREFILL
            # Workers of one GPU type share a node (NVLink); different types are different machines.
            specs.append(WorkerSpec(f"{gpu.split('-')[0].lower()}-{i}", role, gpu_set(gpu, 1), host=gpu,
                                    max_step_tokens=AGGREGATED_CHUNK if split is None else 8192))
    return specs


def static_splits(fleet: FleetSpec, *, frontier_only: bool) -> list[Split]:
    """Every split with at least one prefill and one decode worker; `frontier_only`: prefill goes to the
    GPU types in fleet order (compute-richest first), a type only once the ones before it all prefill."""
    types = fleet.gpus
    total = sum(n for _, n in types)
    out: list[Split] = []

    def grid(i: int, acc: list[tuple[str, int]]) -> None:
        if i == len(types):
            k = sum(n for _, n in acc)
            if 1 <= k <= total - 1:
                out.append(tuple(acc))
            return
        for k in range(types[i][1] + 1):
            grid(i + 1, [*acc, (types[i][0], k)])

    grid(0, [])
    if frontier_only:
        def frontier(split: Split) -> bool:
            return all(split[i][1] == types[i][1] or all(k == 0 for _, k in split[i + 1:]) for i in range(len(split)))
        out = [s for s in out if frontier(s)]
    return out


def split_name(split: Split | None) -> str:
    if split is None:
        return "aggregated"
    return "P " + " + ".join(f"{k} {gpu.split('-')[0]}" for gpu, k in split if k) if any(k for _, k in split) \
        else "P none"


def _profile() -> ModelProfile:
    return get_profile(MODEL)


def _cost() -> CostModel:
    return CostModel(config=CostConfig(same_host_kv_bytes_per_s=SAME_HOST_KV, cross_host_kv_bytes_per_s=CROSS_HOST_KV),
                     params=default_step_params())


def _sim(specs: Sequence[WorkerSpec]) -> FleetSim:
    policy = create_policy("expected-time", cost=_cost(),
                           # The simulator hands the policy exact loads at every decision: nothing to hold in flight.
                           config=PolicyConfig(inflight_hold_s=0))
    # Workload() is run()'s; a trace played by load() and advance() carries its own lengths.
    return FleetSim(specs, _profile(), PARAMS, policy, Workload(), same_host_kv_bytes_per_s=SAME_HOST_KV,
                    cross_host_kv_bytes_per_s=CROSS_HOST_KV)


def window_demand(records: Sequence[Record], start: int, now: float, window_s: float) -> tuple[Demand, int]:
    """Demand over the requests that arrived in (now - window_s, now]; `start` is a search hint (returned
    moved forward): records are in arrival order."""
    while start < len(records) and records[start].arrival <= now - window_s:
        start += 1
    end = start
    while end < len(records) and records[end].arrival <= now:
        end += 1
    seen = records[start:end]
    if not seen:
        return Demand(0.0, 0.0, 0.0), start
    prompts = [r.prompt for r in seen]
    outputs = [r.output for r in seen]
    # Attained latency, as routers report it; a request still waiting for its first token has waited
    # at least this long (a building queue shows before those requests finish).
    ttfts = [(r.first_at if r.first_at is not None else now) - r.arrival for r in seen]
    gaps = [(r.last_at - r.first_at) / (r.tokens - 1) for r in seen
            if r.first_at is not None and r.last_at is not None and r.tokens > 1]
    demand = Demand(arrival_rps=len(seen) / window_s, prompt_tokens=sum(prompts) / len(seen),
                    output_tokens=sum(outputs) / len(seen), prompt_tokens_p90=percentile(prompts, 90),
                    output_tokens_p90=percentile(outputs, 90), ttft_p90_s=percentile(ttfts, 90),
                    inter_token_p90_s=percentile(gaps, 90) if gaps else 0.0)
    return demand, start


def supply(sim: FleetSim) -> list[WorkerSupply]:
    """The planner's view of the simulated workers (a switching one under the role it is switching to)."""
    out = []
    for worker_id, w in sim.workers.items():
        since = w.switch.started if w.switch is not None else w.role_since
        out.append(WorkerSupply(worker_id=worker_id, gpu_type=w.spec.gpus.gpu.catalog_id, gpu_count=w.spec.gpus.count,
                                role=w.role.value, role_since_s=since,
                                kv_capacity_tokens=w.blocks.num_blocks * BLOCK, max_batch_size=w.spec.max_batch))
    return out


def run(job: Job) -> Outcome:
    """One whole run of the trace through one fleet (a pool task: plain values in and out)."""
    started = time.process_time()
    trace = shifting_trace(job.phases, job.seed)
    specs = fleet_specs(job.fleet, None if job.mode == "aggregated" else job.split)
    sim = _sim(specs)
    for w in sim.workers.values():
        # The fleet has served its roles long before the trace starts: no dwell holds the first switch.
        w.role_since = -3600.0
    sim.load(trace)
    end = sum(p.duration_s for p in job.phases)
    plans: list[str] = []
    if job.mode == "planner":
        shape, cost, config = model_shape(_profile()), _cost(), job.planner
        hint, t = 0, job.interval_s
        while t <= end:
            sim.advance(t)
            demand, hint = window_demand(sim.records, hint, t, min(job.window_s, t))
            plan = plan_roles(shape, SLO, demand, supply(sim), now_s=t, config=config, cost=cost)
            for change in plan.changes:
                sim.switch(change.worker_id, Role(change.to_role))
            if plan.changes:
                plans.append(f"{t:6.0f} s  {plan.explanation}")
            t += job.interval_s
    sim.advance(end + DRAIN_S)
    return _outcome(job, sim, trace, time.process_time() - started, plans)


def _outcome(job: Job, sim: FleetSim, trace: Sequence[Record], cpu_s: float, plans: list[str]) -> Outcome:
    goodput, attainment, ttft, tpot = [], [], [], []
    for number, phase in enumerate(job.phases):
        mine = [r for r in trace if r.phase == number]
        met = sum(r.meets(SLO.ttft_s, SLO.inter_token_s) for r in mine)
        goodput.append(met / phase.duration_s)
        attainment.append(met / max(1, len(mine)))
        ttft.append(p90([r.ttft for r in mine]))
        tpot.append(p90([r.tpot for r in mine]))
    overall = sum(g * p.duration_s for g, p in zip(goodput, job.phases, strict=True)) / sum(
        p.duration_s for p in job.phases)
    switches = [{"start_s": round(s.started, 2), "end_s": None if s.ended is None else round(s.ended, 2),
                 "worker": s.worker_id, "from": s.from_role.value, "to": s.to_role.value,
                 "handed_over": s.handed_over} for s in sorted(sim.switches, key=lambda s: s.started)]
    return Outcome(job, goodput, overall, attainment, ttft, tpot, sum(r.migrations for r in trace), switches, plans,
                   cpu_s)


def nominal_demand(phase: Phase) -> Demand:
    """A phase's demand as its definition gives it (uniform lengths: mean and 90th percentile)."""
    (plo, phi), (olo, ohi) = phase.prompt_tokens, phase.output_tokens
    return Demand(phase.rate_rps, (plo + phi) / 2, (olo + ohi) / 2, plo + 0.9 * (phi - plo), olo + 0.9 * (ohi - olo))


def predicted(fleet: FleetSpec, split: Split, phase: Phase) -> float:
    """The planner's predicted goodput (req/s) of a static split at a phase's nominal demand."""
    sim = _sim(fleet_specs(fleet, split))
    return predict_goodput(model_shape(_profile()), SLO, nominal_demand(phase), supply(sim), cost=_cost()).goodput_rps


def p90(values: Sequence[float]) -> float:
    """Nearest-rank 90th percentile (an unfinished request's inf stays inf); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def _fmt(x: float, digits: int = 2) -> str:
    return "inf" if math.isinf(x) else "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (math.inf if a > 0 else 1.0)


def report(fleet: FleetSpec, statics: list[Outcome], aggregated: Outcome, planner: Outcome) -> dict[str, Any]:
    """Prints one fleet's tables; returns its figures for --json."""
    best = max(statics, key=lambda o: o.overall)
    phases = planner.job.phases
    names = [p.name for p in phases]
    print(f"\n## {fleet.title} ({MODEL}, 1 GPU per worker)")
    print("arrival rates: " + ", ".join(f"{p.name} {p.rate_rps:g} req/s" for p in phases))
    rows = []
    for label, o in (("planner enacting", planner), (f"best static: {split_name(best.job.split)}", best),
                     ("aggregated", aggregated)):
        rows.append([label, *(_fmt(g) for g in o.goodput), _fmt(o.overall)])
    rows.append(["planner / best static", *(f"{_ratio(a, b):.2f}x" for a, b in zip(planner.goodput, best.goodput,
                                                                               strict=True)),
                 f"{_ratio(planner.overall, best.overall):.2f}x"])
    rows.append(["planner / aggregated", *(f"{_ratio(a, b):.2f}x" for a, b in zip(planner.goodput,
                                                                              aggregated.goodput, strict=True)),
                 f"{_ratio(planner.overall, aggregated.overall):.2f}x"])
    per_phase_best = [max(statics, key=lambda o: o.goodput[i]) for i in range(len(phases))]
    # What any role-switching strategy could reach: each phase's best split, switched to instantly and for
    # free at the phase boundary. Its ratio to the best static split is the ceiling of the goal's ratio.
    oracle = sum(o.goodput[i] * p.duration_s for i, (o, p) in enumerate(zip(per_phase_best, phases, strict=True))
                 ) / sum(p.duration_s for p in phases)
    rows.append(["best static per phase (hindsight)", *(f"{o.goodput[i]:.2f} ({split_name(o.job.split)})"
                                                         for i, o in enumerate(per_phase_best)), _fmt(oracle)])
    rows.append(["planner / best per phase", *(f"{_ratio(planner.goodput[i], o.goodput[i]):.2f}x"
                                               for i, o in enumerate(per_phase_best)),
                 f"{_ratio(planner.overall, oracle):.2f}x"])
    print("goodput at SLO, req/s (requests meeting it, per second of the phase they arrived in):")
    print(table(["run", *names, "overall"], rows))
    print("\nSLO attainment and p90 latencies per phase (TTFT s / mean inter-token ms):")
    detail = []
    for label, o in (("planner", planner), ("best static", best), ("aggregated", aggregated)):
        detail.append([label, *(f"{a:.0%}  {_fmt(t)} / {_fmt(i * 1000, 1)}" for a, t, i in
                                zip(o.attainment, o.ttft_p90, o.tpot_p90, strict=True)),
                       str(o.migrations)])
    print(table(["run", *names, "streams handed over"], detail))
    print("\nevery static split: simulated goodput, req/s (the planner's prediction for the phase's nominal demand):")
    ranked = sorted(statics, key=lambda o: -o.overall)
    print(table(["split (prefill workers)", *names, "overall"],
                [[split_name(o.job.split), *(f"{g:.2f} ({predicted(fleet, o.job.split, p):.2f})"
                                             for g, p in zip(o.goodput, phases, strict=True)), _fmt(o.overall)]
                 for o in ranked]))
    print(f"\nplanner switch log (starts from {split_name(planner.job.split)}; drain ends when the worker serves "
          "its new role):")
    if planner.switches:
        print(table(["asked at s", "worker", "from -> to", "serving at s", "drain s", "streams handed over"],
                    [[f"{s['start_s']:.0f}", s["worker"], f"{s['from']} -> {s['to']}",
                      "-" if s["end_s"] is None else f"{s['end_s']:.1f}",
                      "-" if s["end_s"] is None else f"{s['end_s'] - s['start_s']:.1f}",
                      str(s["handed_over"])] for s in planner.switches]))
    else:
        print("  (no switches)")
    print("\nplanner rounds that changed something:")
    for line in planner.plans:
        print(f"  {line}")
    overall_ratio = _ratio(planner.overall, best.overall)
    phase_ratios = [_ratio(a, b) for a, b in zip(planner.goodput, best.goodput, strict=True)]
    return {
        "fleet": fleet.title,
        "rates_rps": [p.rate_rps for p in phases],
        "phases": names,
        "planner": dataclasses.asdict(planner) | {"job": None, "start_split": split_name(planner.job.split)},
        "best_static": {"split": split_name(best.job.split), "goodput": best.goodput, "overall": best.overall},
        "aggregated": {"goodput": aggregated.goodput, "overall": aggregated.overall},
        "statics": [{"split": split_name(o.job.split), "goodput": o.goodput, "overall": o.overall} for o in ranked],
        "oracle_overall": oracle,
        "ceiling_ratio": _ratio(oracle, best.overall),
        "ratio_overall": overall_ratio,
        "ratio_per_phase": phase_ratios,
        "goal_overall_pass": overall_ratio >= 1.3,
        "goal_phases_pass": all(r >= 0.9 for r in phase_ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="20 s phases and the frontier static splits only (a smoke test, not the result)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--seed", type=int, default=1, help="trace seed (the same trace for every run of a fleet)")
    parser.add_argument("--jobs", type=int, default=2, help="simulations run in parallel (default 2)")
    parser.add_argument("--phase-s", type=float, default=0.0, help="seconds per phase (default 180; quick 20)")
    parser.add_argument("--interval-s", type=float, default=15.0, help="planner round interval, virtual s (15)")
    parser.add_argument("--window-s", type=float, default=30.0, help="demand window, virtual s (30)")
    parser.add_argument("--fleet", choices=("mixed", "h100", "both"), default="both")
    defaults = PlannerConfig()
    parser.add_argument("--max-switches", type=int, default=defaults.max_switches,
                        help=f"PlannerConfig.max_switches (default {defaults.max_switches})")
    parser.add_argument("--min-gain", type=float, default=defaults.min_gain,
                        help=f"PlannerConfig.min_gain (default {defaults.min_gain:g})")
    parser.add_argument("--min-dwell-s", type=float, default=defaults.min_dwell_s,
                        help=f"PlannerConfig.min_dwell_s (default {defaults.min_dwell_s:g})")
    parser.add_argument("--scale", type=int, default=1,
                        help="workers of each GPU type and arrival rates times this (2: 4+4 and 8 GPUs; "
                             "CPU time grows about 3x per doubling)")
    args = parser.parse_args()
    if args.scale < 1 or args.jobs < 1 or args.interval_s <= 0 or args.window_s <= 0 or args.phase_s < 0:
        parser.error("--scale and --jobs must be >= 1, --interval-s and --window-s > 0, --phase-s >= 0")
    config = dataclasses.replace(defaults, max_switches=args.max_switches, min_gain=args.min_gain,
                                 min_dwell_s=args.min_dwell_s)
    wall = time.monotonic()
    phase_s = args.phase_s or (20.0 if args.quick else 0.0)
    fleets = [FLEETS[name].scaled(args.scale) for name in (("mixed", "h100") if args.fleet == "both" else
                                                          (args.fleet,))]

    print_header(f"planner on a shifting workload: {MODEL} on simulated fleets, seed {args.seed}"
                 + (" (quick: a smoke test, not the result)" if args.quick else ""))
    print("workload (one trace per fleet for every run; Poisson arrivals, lengths uniform in the ranges; each "
          "fleet's rates are given with its table):")
    for phase in fleets[0].phases(phase_s):
        print(f"  - {dataclasses.replace(phase, rate_rps=0).describe().replace(' at 0 req/s', '')}")
    print(f"SLO: TTFT <= {SLO.ttft_s:g} s and mean inter-token time over the request <= "
          f"{SLO.inter_token_s * 1000:g} ms; goodput = requests meeting both per second")
    profile = _profile()
    kv = kv_capacity_blocks(gpu_set(H100, 1), profile, BLOCK, PARAMS) * BLOCK
    for line in (f"{profile.describe()}; the calibrated step model; {kv} KV tokens per 80 GB GPU; max batch 256",
                 f"routing: the router's expected-time policy; KV transfer {SAME_HOST_KV / 1e9:g} GB/s within a "
                 f"GPU type's node, {CROSS_HOST_KV / 1e9:g} GB/s between nodes; aggregated workers prefill in "
                 f"{AGGREGATED_CHUNK}-token chunks",
                 f"a switch: the worker is not routable, its prefills finish, decode streams still running after "
                 f"{HANDOVER_GRACE_S:g} s are handed over (re-prefilled with their tokens on another decode "
                 "worker); no model reload",
                 f"planner: every {args.interval_s:g} s on the last {args.window_s:g} s of arrivals, starting from "
                 f"the best static split; {config}"):
        print(f"  - {line}")

    first = []
    for fleet in fleets:
        common = {"phases": fleet.phases(phase_s), "seed": args.seed, "interval_s": args.interval_s,
                  "window_s": args.window_s, "planner": config}
        first += [Job(fleet, "static", split=s, **common) for s in static_splits(fleet, frontier_only=args.quick)]
        first.append(Job(fleet, "aggregated", **common))
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        done = pool.map(run, first, chunksize=1)
        statics = {f: [o for o in done if o.job.fleet == f and o.job.mode == "static"] for f in fleets}
        starts = [dataclasses.replace(max(statics[f], key=lambda o: o.overall).job, mode="planner") for f in fleets]
        planners = pool.map(run, starts, chunksize=1)
    figures = []
    for fleet, planner in zip(fleets, planners, strict=True):
        aggregated = next(o for o in done if o.job.fleet == fleet and o.job.mode == "aggregated")
        figures.append(report(fleet, statics[fleet], aggregated, planner))
    cpu = sum(o.cpu_s for o in [*done, *planners])
    elapsed = time.monotonic() - wall
    print(f"\n({len(done) + len(planners)} simulations, {cpu:.0f} s of CPU, {elapsed:.0f} s wall with "
          f"{args.jobs} jobs)\n")
    for fig in figures:
        ratios = ", ".join(f"{n} {r:.2f}x" for n, r in zip(fig["phases"], fig["ratio_per_phase"], strict=True))
        print(f"{'PASS' if fig['goal_overall_pass'] else 'FAIL'}: {fig['fleet']}: planner / best static over the "
              f"run {fig['ratio_overall']:.2f}x (goal >= 1.3x; instant per-phase best splits would reach "
              f"{fig['ceiling_ratio']:.2f}x)")
        print(f"{'PASS' if fig['goal_phases_pass'] else 'FAIL'}: {fig['fleet']}: planner / best static in every "
              f"phase >= 0.9x ({ratios})")
    if args.json:
        args.json.write_text(json.dumps({"slo": dataclasses.asdict(SLO), "seed": args.seed, "quick": args.quick,
                                         "scale": args.scale, "planner_config": dataclasses.asdict(config),
                                         "interval_s": args.interval_s, "window_s": args.window_s, "cpu_s": cpu,
                                         "wall_s": elapsed, "fleets": figures},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
