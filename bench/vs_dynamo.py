"""Tandem's router (OpenAI HTTP front) next to NVIDIA Dynamo 1.6.1's frontend: same client, same machine, same run.

    .venv/bin/python bench/vs_dynamo.py [--quick] [--requests N] [--rounds 2] [--concurrency 16]
                                        [--dynamo-venv /tmp/dyn/venv] [--dynamo-model-dir DIR]

Real processes on this machine. Tandem: etcd, a sim decode worker and a sim
prefill worker (llama-3-8b on a simulated H100, speedup 1000) and a router
whose HTTP front takes the requests; prompts of up to 16 tokens prefill on
the decode worker, longer ones disaggregate. Dynamo (only with
`--dynamo-venv`, a venv with ai-dynamo 1.6.1): two deployments with file
discovery, an aggregated one (frontend + mocker) and a disaggregated one
(frontend + prefill mocker + decode mocker), mockers at speedup 1000; the
model directory (tokenizer + Llama-8B-shaped config, no weights) is written
once with that venv's python and cached. Engine time is microseconds on
both sides: what is measured is software.

One client process (bench/_openai_load.py: raw HTTP/1.1 keep-alive, one
connection per caller, `--concurrency` in flight) sends `POST
/v1/completions` with token-id prompts unique per request (no prefix-cache
hits anywhere), `--max-tokens` completion tokens with ignore_eos, over four
paths: aggregated (8-token prompt) and disaggregated (64-token prompt),
each non-streamed and streamed (with stream_options.include_usage). Every
answer must carry the full completion; errors are counted and make the run
fail. On streamed paths Tandem runs twice, as two routers over the same
workers: with its default `--stream-interval-ms` (at most one event per 2 ms;
tokens faster than that travel together) and per token (`0`: each batch as
the decode worker sends it, as Dynamo's frontend streams). Each path runs
`--rounds` times per system, Tandem and Dynamo
interleaved (who goes first alternates by round), each run after a warm-up
of max(100, N/10) requests outside its measured window.

Prints per path and run: requests/s, p50/p99 latency (and time to first
token when streamed), CPU milliseconds per request of each server process
and of the client (/proc/<pid>/stat, read at the measured window's edges),
and how the requests were routed (Tandem: its router's decisions, local or
disaggregated; Dynamo: its frontend's routes by phase); then the median and
mean per system, the load average at start and end, and last the
Tandem/Dynamo ratios of requests/s and of the front's CPU per request. Not
a pass/fail test; other work on the machine skews the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SIM_8B, cpu_seconds, percentile, print_header, table, testbed, wait_routable
from _dynamo import Deployment, dynamo_version, ensure_model, scrape_counts
from _openai_load import LoadClient, LoadJob, LoadResult, UniquePrompts

from tests.support.testbed import Testbed

MODEL = "llama-3-8b"
LOCAL_PREFILL_MAX = 16
ROLES = ("front", "decode", "prefill", "etcd")
DISTINCT_PROMPTS = 250 * 250  # UniquePrompts' first two tokens
PER_TOKEN = "Tandem, per-token"


@dataclass(frozen=True)
class LoadPath:
    label: str
    prompt_tokens: int
    stream: bool

    @property
    def disaggregated(self) -> bool:
        return self.prompt_tokens > LOCAL_PREFILL_MAX


PATHS = (LoadPath("aggregated / local prefill, 8-token prompt", 8, False),
         LoadPath("disaggregated, 64-token prompt", 64, False),
         LoadPath("aggregated / local prefill, 8-token prompt, streamed", 8, True),
         LoadPath("disaggregated, 64-token prompt, streamed", 64, True))


@dataclass(frozen=True)
class Target:
    """One system's server for a path: its HTTP port, its processes by role, how to read its routes."""

    system: str
    port: int
    pids: dict[str, int]
    routes: Callable[[], Counter[str]]
    # The routes every request of the path must take (one count per request each).
    expect: tuple[str, ...]
    # Measured on streamed paths only (a variant that differs only in how it streams).
    streams_only: bool = False


@dataclass
class Run:
    system: str
    round: int
    result: LoadResult
    cpu_ms: dict[str, float]  # per measured request, by role and "client"
    routes: Counter[str]

    @property
    def rps(self) -> float:
        return len(self.result.latencies_s) / self.result.wall_s if self.result.wall_s else 0.0

    def figures(self) -> dict[str, float]:
        lat = [x * 1000 for x in self.result.latencies_s]
        ttft = [x * 1000 for x in self.result.ttfts_s]
        return {"rps": self.rps, "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                "ttft": percentile(ttft, 50), **self.cpu_ms}


def _tandem_routes(metrics_port: int) -> Callable[[], Counter[str]]:
    from router_svc.policy import (
        REASON_LOCAL_REQUIRED,
        REASON_NO_PREFILL,
        REASON_PREFILL_SATURATED,
        REASON_PREFIX_CACHED,
        REASON_SHORT_PROMPT,
    )

    local = {REASON_SHORT_PROMPT, REASON_NO_PREFILL, REASON_PREFILL_SATURATED, REASON_LOCAL_REQUIRED,
             REASON_PREFIX_CACHED}

    def routes() -> Counter[str]:
        counts = Counter[str]()
        reasons = scrape_counts(f"http://127.0.0.1:{metrics_port}/metrics", "tandem_router_decisions_total", "reason")
        for reason, n in reasons.items():
            counts["local" if reason in local else "disaggregated"] += n
        return counts

    return routes


def _measure(client: LoadClient, target: Target, job: LoadJob, round_: int) -> tuple[Run, list[str]]:
    """One run of `job` against `target`; returns it and what went wrong (errors, unexpected routes)."""

    def cpu() -> dict[str, float]:
        return {role: cpu_seconds(pid) for role, pid in target.pids.items()}

    def at_start() -> tuple[Counter[str], dict[str, float]]:
        routes = target.routes()  # before the CPU: the scrape's own CPU stays out of the window
        return routes, cpu()

    def at_end() -> tuple[Counter[str], dict[str, float]]:
        used = cpu()
        return target.routes(), used

    result, (routes0, cpu0), (routes1, cpu1) = client.run(job, at_start, at_end)
    done = max(1, len(result.latencies_s))
    cpu_ms = {role: (cpu1[role] - cpu0[role]) * 1000 / done for role in target.pids}
    cpu_ms["client"] = result.client_cpu_s * 1000 / done
    run = Run(target.system, round_, result, cpu_ms, routes1 - routes0)
    problems = []
    name = f"{target.system} round {round_}"
    if result.error_count or result.warmup_error_count:
        problems.append(f"{name}: {result.error_count} errors in {job.requests} measured requests and "
                        f"{result.warmup_error_count} in {job.warmup} warm-up ones, e.g. {result.errors}")
    wanted = Counter({route: job.requests for route in target.expect})
    if run.routes != wanted:
        problems.append(f"{name}: routes {dict(run.routes)}, expected {dict(wanted)}")
    return run, problems


def _fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _rows(runs: list[Run], stream: bool) -> list[list[str]]:
    rows = []
    for system in dict.fromkeys(run.system for run in runs):
        mine = [run for run in runs if run.system == system]
        figures = [run.figures() for run in mine]
        for run, fig in zip(mine, figures, strict=True):
            routes = ", ".join(f"{k} {v}" for k, v in sorted(run.routes.items())) or "-"
            rows.append(_row(system, str(run.round), fig, stream, routes, str(run.result.error_count)))
        for name, stat in (("median", statistics.median), ("mean", statistics.fmean)):
            summary = {key: stat([fig[key] for fig in figures]) for key in figures[0]}
            rows.append(_row(system, name, summary, stream, "", ""))
    return rows


def _row(system: str, round_: str, fig: dict[str, float], stream: bool, routes: str, errors: str) -> list[str]:
    return [system, round_, f"{fig['rps']:.0f}", _fmt(fig["p50"]), _fmt(fig["p99"]),
            _fmt(fig["ttft"]) if stream else "-", *(_fmt(fig.get(role)) for role in (*ROLES, "client")),
            routes, errors]


def _tandem_targets(factory: Testbed, args: argparse.Namespace) -> dict[str, list[Target]]:
    """Starts Tandem's fleet: the workers, the router, and a per-token router over the same workers."""
    sim = (*SIM_8B, "--speedup", f"{args.speedup:g}", "--max-batch-size", str(max(16, args.concurrency)))
    decode = factory.start("d0", "decode_svc", *sim)
    prefill = factory.start("p0", "prefill_svc", *sim)
    common = ("--http-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--local-prefill-max-prompt-tokens",
              str(LOCAL_PREFILL_MAX))
    router = factory.start("router", "router_svc", *common)
    # The same router streaming each token batch as the worker sends it (what Dynamo's frontend does),
    # instead of at most one event per --stream-interval-ms (default 2 ms).
    per_token = factory.start("router-per-token", "router_svc", *common, "--stream-interval-ms", "0")
    wait_routable(router.endpoint, MODEL)
    wait_routable(per_token.endpoint, MODEL)
    workers = {"decode": decode.pid, "prefill": prefill.pid, "etcd": factory.etcd.pid or 0}
    return {mode: [Target("Tandem", int(router.info["http_port"]), {"front": router.pid, **workers},
                          _tandem_routes(int(router.info["metrics_port"])), (route,)),
                   Target(PER_TOKEN, int(per_token.info["http_port"]), {"front": per_token.pid, **workers},
                          _tandem_routes(int(per_token.info["metrics_port"])), (route,), streams_only=True)]
            for mode, route in (("agg", "local"), ("disagg", "disaggregated"))}


def _start_dynamo(args: argparse.Namespace, root: Path, deployments: dict[str, Deployment],
                  targets: dict[str, list[Target]]) -> None:
    """Starts Dynamo's aggregated and disaggregated deployments (into `deployments`, for the caller to stop)."""
    model = ensure_model(args.dynamo_venv, args.dynamo_model_dir)
    for mode in ("agg", "disagg"):
        deployments[mode] = Deployment(mode, args.dynamo_venv, model, root, model_name=MODEL,
                                       speedup=args.speedup).start()
    for mode, dyn in deployments.items():
        dyn.wait_ready()
        expect = ("aggregated",) if mode == "agg" else ("decode", "prefill")
        targets[mode].append(Target("Dynamo", dyn.port, dyn.pids, dyn.routes, expect))


def _measure_all(client: LoadClient, targets: dict[str, list[Target]], args: argparse.Namespace, requests: int,
                 warmup: int, runs: dict[str, list[Run]], problems: list[str]) -> None:
    """Every path, round and system, interleaved (who goes first alternates by round)."""
    # Request numbers never repeat within a fleet: Tandem's two routers share its workers' caches.
    first = dict.fromkeys(("Tandem", "Dynamo"), 0)
    for path in PATHS:
        for round_ in range(1, args.rounds + 1):
            mode = "disagg" if path.disaggregated else "agg"
            order = targets[mode] if round_ % 2 else targets[mode][::-1]
            for target in (t for t in order if path.stream or not t.streams_only):
                fleet = "Dynamo" if target.system == "Dynamo" else "Tandem"
                job = LoadJob("127.0.0.1", target.port, MODEL, UniquePrompts(path.prompt_tokens), path.stream,
                              requests, warmup, first=first[fleet], concurrency=args.concurrency,
                              max_tokens=args.max_tokens)
                first[fleet] += warmup + requests
                run, trouble = _measure(client, target, job, round_)
                runs[path.label].append(run)
                problems += [f"{path.label}, {p}" for p in trouble]
                for p in trouble:
                    print(f"!!! {path.label}, {p}", file=sys.stderr, flush=True)
                print(f"  measured: {path.label}, {target.system} round {round_}: {run.rps:.0f} req/s",
                      file=sys.stderr, flush=True)


def _report(runs: dict[str, list[Run]], problems: list[str], loads: tuple[tuple[float, ...], tuple[float, ...]],
            dynamo_ran: bool, rounds: int) -> None:
    print("CPU ms/req: front = Tandem router / Dynamo frontend; decode = sim decode worker / mocker (aggregated or "
          "decode); prefill = sim prefill worker / prefill mocker; client = the load client; routes = Tandem's "
          "router decisions / Dynamo's frontend routes by phase, in the measured window")
    for path in PATHS:
        print(f"\n{path.label}")
        print(table(["system", "round", "req/s", "p50 ms", "p99 ms", "TTFT p50 ms", "front", "decode", "prefill",
                     "etcd", "client", "routes", "errors"], _rows(runs[path.label], path.stream)))
    print(f"\nload average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in loads[0])} at start, "
          f"{', '.join(f'{x:.1f}' for x in loads[1])} at end; all processes share "
          f"{len(os.sched_getaffinity(0))} cores")
    if problems:
        print(f"\n!!! {len(problems)} PROBLEMS: the figures above are not to be trusted", flush=True)
        for problem in problems:
            print(f"!!! {problem}", flush=True)
    if not dynamo_ran:
        print("\nDynamo was not run (no --dynamo-venv): no Tandem/Dynamo ratios")
        return
    print()
    for path in PATHS:
        medians = {}
        for system in ("Tandem", PER_TOKEN, "Dynamo"):
            figures = [run.figures() for run in runs[path.label] if run.system == system]
            if figures:
                medians[system] = {key: statistics.median(f[key] for f in figures) for key in ("rps", "front")}
        d = medians["Dynamo"]
        for system in ("Tandem", PER_TOKEN):
            if system in medians:
                t = medians[system]
                print(f"{system}/Dynamo, {path.label}: req/s {_ratio(t['rps'], d['rps'])}, front CPU ms/req "
                      f"{_ratio(t['front'], d['front'])} (medians of {rounds})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--requests", type=int, default=0, help="measured requests per run (default 3000; quick 600)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per path and system, interleaved")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight from the client")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--speedup", type=float, default=1000.0, help="sim engine and mocker speedup")
    parser.add_argument("--dynamo-venv", type=Path, default=None, help="a venv with ai-dynamo 1.6.1 (else Tandem only)")
    parser.add_argument("--dynamo-model-dir", type=Path, default=Path(tempfile.gettempdir()) / "tandem-vs-dynamo-model",
                        help="where the mocker's model directory is cached (written when absent)")
    args = parser.parse_args()
    requests = args.requests or (600 if args.quick else 3000)
    warmup = max(100, requests // 10)
    per_system = (len(PATHS) + sum(path.stream for path in PATHS)) * args.rounds * (warmup + requests)
    if per_system > DISTINCT_PROMPTS:
        parser.error(f"{per_system} requests per system would repeat prompts (at most {DISTINCT_PROMPTS})")

    print_header(f"Tandem router vs Dynamo 1.6.1 frontend, OpenAI HTTP: sim engine / mocker x{args.speedup:g}, "
                 f"{args.max_tokens}-token completions, concurrency {args.concurrency}, {requests} requests "
                 f"per run (+{warmup} warm-up), rounds: {args.rounds}")
    load_start = os.getloadavg()
    if args.dynamo_venv:
        print(f"# Dynamo: ai-dynamo {dynamo_version(args.dynamo_venv)} from {args.dynamo_venv}; mocker model "
              f"directory {args.dynamo_model_dir}", flush=True)
    factory = testbed()
    root = Path(tempfile.mkdtemp(prefix="tandem-vs-dynamo-"))
    deployments: dict[str, Deployment] = {}
    client = LoadClient()
    runs: dict[str, list[Run]] = {path.label: [] for path in PATHS}
    problems: list[str] = []
    left: list[str] = []
    try:
        targets = _tandem_targets(factory, args)
        if args.dynamo_venv:
            _start_dynamo(args, root, deployments, targets)
        client.start()
        _measure_all(client, targets, args, requests, warmup, runs, problems)
    finally:
        client.close()
        for mode, dyn in deployments.items():
            left += [f"dynamo-{mode} {role}" for role in dyn.close()]
        left += factory.close()
        shutil.rmtree(root, ignore_errors=True)
    if left:
        problems.append(f"processes left running: {left}")
    _report(runs, problems, (load_start, os.getloadavg()), bool(deployments), args.rounds)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
