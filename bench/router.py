"""Router throughput and added latency against calling a decode worker directly, measured in the same run.

    .venv/bin/python bench/router.py [--quick] [--requests N] [--concurrency 16] [--profile]

Real processes on this machine: etcd, one sim decode worker and one sim
prefill worker (llama-3-8b on a simulated H100, speedup 1000, so engine time
is microseconds and what is measured is the software), and one router. A
client process (its own process, so its CPU is not the router's; grpc.aio,
`--concurrency` calls in flight) sends 32-token completions:

- baseline: `Decode` on the decode worker directly (the worker prefills);
- `Complete` on the router with a short prompt (the decode worker prefills
  locally: one worker call per request);
- `Complete` on the router with a longer prompt (disaggregated: Prefill on
  the prefill worker, KV handle, Decode on the decode worker).

Prints requests/s, p50/p99 latency and CPU milliseconds per request of each
process (from /proc/<pid>/stat), then, last, the router's ratios against the
direct baseline and against the anchor (a Rust frontend and router with a
simulated engine: ~1100 requests/s, ~0.8 ms CPU per request on this class of
machine). `--profile` runs the router under cProfile and prints its hottest
functions. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    SIM_8B,
    cpu_seconds,
    percentile,
    print_header,
    table,
    testbed,
    wait_routable,
)

MODEL = "llama-3-8b"
ANCHOR_RPS = 1100.0
ANCHOR_CPU_MS = 0.8
LOCAL_PREFILL_MAX = 16


# -- the client process --------------------------------------------------------------


def _client_main(conn) -> None:
    while True:
        command = conn.recv()
        if command is None:
            return
        conn.send(asyncio.run(_client_run(**command)))


async def _client_run(*, mode: str, endpoint: str, warmup: int, requests: int, concurrency: int,
                      prompt_tokens: int, max_tokens: int) -> dict[str, object]:
    import os

    import grpc

    from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    channel = grpc.aio.insecure_channel(endpoint)
    await channel.channel_ready()
    decode = worker_pb2_grpc.DecodeStub(channel)
    inference = inference_pb2_grpc.InferenceStub(channel)
    routes: dict[str, int] = {}

    def prompt(i: int) -> list[int]:
        # Different first two tokens per request (unique up to 62,500 requests): no prefix-cache hits to
        # flatter either path, and no prefix-aware local prefill to turn the disaggregated path local.
        return [3 + (i % 250), 3 + (i // 250) % 250, *range(40, 40 + prompt_tokens - 2)]

    async def one(i: int) -> int:
        if mode == "direct":
            tokens = 0
            async for step in decode.Decode(worker_pb2.DecodeRequest(
                    request_id=f"bench-{i}", model=MODEL, prompt_token_ids=prompt(i), sampling=sampling), timeout=30):
                tokens += len(step.token_ids)
            return tokens
        reply = await inference.Complete(inference_pb2.GenerateRequest(
            request_id=f"bench-{i}", model=MODEL, prompt_token_ids=prompt(i), sampling=sampling), timeout=30)
        key = "local" if reply.route.local_prefill else "disaggregated"
        routes[key] = routes.get(key, 0) + 1
        return len(reply.token_ids)

    latencies: list[float] = []
    errors: list[str] = []

    async def run(total: int, record: bool) -> None:
        counter = iter(range(total))

        async def loop() -> None:
            for i in counter:
                started = time.perf_counter()
                try:
                    got = await one(i)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                if got != max_tokens:
                    errors.append(f"got {got} tokens, wanted {max_tokens}")
                elif record:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(loop() for _ in range(concurrency)))

    await run(warmup, record=False)
    routes.clear()
    cpu_before = time.process_time()
    started = time.perf_counter()
    await run(requests, record=True)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    await channel.close()
    return {"latencies": latencies, "wall": wall, "cpu": cpu, "errors": errors[:5], "error_count": len(errors),
            "routes": routes, "pid": os.getpid()}


# -- the benchmark ---------------------------------------------------------------------


def _print_profile(path: Path, top: int = 30) -> None:
    print(f"\nrouter profile (cProfile, {path}): top {top} by own time, then by cumulative time")
    stats = pstats.Stats(str(path))
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (about 30 s in all)")
    parser.add_argument("--requests", type=int, default=0, help="measured requests per path (default 3000; quick 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight from the client")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--speedup", type=float, default=1000.0, help="sim engine speedup")
    parser.add_argument("--profile", action="store_true", help="run the router under cProfile; print hot spots")
    args = parser.parse_args()
    requests = args.requests or (600 if args.quick else 3000)
    warmup = max(100, requests // 10)

    print_header(f"router throughput: sim engine x{args.speedup:g}, {args.max_tokens}-token completions, "
                 f"concurrency {args.concurrency}, {requests} requests per path")
    factory = testbed(keep=args.profile)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=_client_main, args=(child,), daemon=True)
    profile_path = factory.root / "router.prof"
    rows = []
    results: dict[str, dict[str, float]] = {}
    try:
        sim = (*SIM_8B, "--speedup", str(args.speedup), "--max-batch-size", str(max(16, args.concurrency)))
        decode = factory.start("d0", "decode_svc", *sim)
        prefill = factory.start("p0", "prefill_svc", *sim)
        # Not `-m cProfile -m router_svc`: that runs the module as cProfile's __main__, where the
        # settings' type hints do not resolve.
        python = [sys.executable, "-c", "import cProfile, sys; from router_svc.__main__ import main; "
                  "cProfile.run('main(sys.argv[1:])', sys.argv.pop(1))", str(profile_path)] if args.profile else ()
        router = factory.start("router", "router_svc", "--local-prefill-max-prompt-tokens", str(LOCAL_PREFILL_MAX),
                               python=python)
        wait_routable(router.endpoint, MODEL)
        client.start()
        paths = [
            ("direct Decode (baseline)", "direct", decode.endpoint, 8),
            ("router, local prefill", "router", router.endpoint, 8),
            ("router, disaggregated", "router", router.endpoint, 4 * LOCAL_PREFILL_MAX),
        ]
        procs = {"router": router, "decode": decode, "prefill": prefill}
        for label, mode, endpoint, prompt_tokens in paths:
            before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
            parent.send({"mode": mode, "endpoint": endpoint, "warmup": warmup, "requests": requests,
                         "concurrency": args.concurrency, "prompt_tokens": prompt_tokens,
                         "max_tokens": args.max_tokens})
            # The warm-up's CPU is in the client's reply window only: re-read after it.
            out = parent.recv()
            after = {name: cpu_seconds(p.pid) for name, p in procs.items()}
            done = len(out["latencies"])
            if out["error_count"]:
                print(f"  {label}: {out['error_count']} errors, e.g. {out['errors']}", file=sys.stderr)
            total = done + out["error_count"]
            # CPU deltas span warm-up + measured requests: divide by both.
            per_req = {name: (after[name] - before[name]) * 1000 / max(1, total + warmup) for name in procs}
            lat = [x * 1000 for x in out["latencies"]]
            rps = done / out["wall"]
            results[label] = {"rps": rps, "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                              "router_cpu": per_req["router"]}
            route = ", ".join(f"{k} {v}" for k, v in sorted(out["routes"].items())) or "-"
            rows.append([label, f"{rps:.0f}", f"{percentile(lat, 50):.2f}", f"{percentile(lat, 99):.2f}",
                         f"{per_req['router']:.2f}", f"{per_req['decode']:.2f}", f"{per_req['prefill']:.2f}",
                         f"{out['cpu'] * 1000 / max(1, done):.2f}", route])
            print(f"  measured: {label}", file=sys.stderr, flush=True)
    finally:
        if client.is_alive():
            parent.send(None)
            client.join(10)
        if client.is_alive():
            client.kill()
            client.join(5)
        factory.close()
        left = factory.leftovers()
        if left:
            print(f"warning: still running after close: {left}", file=sys.stderr)

    print(table(["path", "req/s", "p50 ms", "p99 ms", "router CPU ms/req", "decode CPU ms/req",
                 "prefill CPU ms/req", "client CPU ms/req", "routes"], rows))
    print(f"(all processes share {len(__import__('os').sched_getaffinity(0))} cores; CPU per request includes "
          "the warm-up requests in numerator and denominator)")
    if args.profile and profile_path.exists():
        _print_profile(profile_path)
    base = results["direct Decode (baseline)"]
    print()
    for label in ("router, local prefill", "router, disaggregated"):
        r = results[label]
        print(f"{label}: {r['rps'] / base['rps']:.0%} of direct req/s; added latency p50 "
              f"{r['p50'] - base['p50']:+.2f} ms, p99 {r['p99'] - base['p99']:+.2f} ms; "
              f"vs anchor: {r['rps'] / ANCHOR_RPS:.0%} of {ANCHOR_RPS:.0f} req/s, "
              f"{r['router_cpu'] / ANCHOR_CPU_MS:.1f}x its {ANCHOR_CPU_MS} ms CPU/req")


if __name__ == "__main__":
    main()
