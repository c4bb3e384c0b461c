"""The router's CPU per request through its OpenAI-compatible HTTP API next to its gRPC API, same run.

    .venv/bin/python bench/http_api.py [--quick] [--requests N] [--concurrency 16] [--max-tokens 32]
    .venv/bin/python bench/http_api.py --stacks       # the HTTP stacks alone (the library choice)

Real processes on this machine: etcd, a sim decode worker and a sim
prefill worker (llama-3-8b on a simulated H100, speedup 1000: engine time
is microseconds, what is measured is software) and one router serving both
fronts. A client in its own process sends the same requests (8-token
token-id prompts, prefilled on the decode worker; `--max-tokens`
completion tokens, ignore_eos) over each path in turn, `--concurrency` in
flight:

- gRPC `Complete` and HTTP `POST /v1/completions` (non-streaming);
- gRPC `Generate` and HTTP `POST /v1/completions` with `"stream": true`.

Prints requests/s, p50/p99 latency and the router's CPU milliseconds per
request (from /proc/<pid>/stat around the measured window), then the
HTTP/gRPC ratio of each pair. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SIM_8B, cpu_seconds, percentile, print_header, table, testbed, wait_routable

MODEL = "llama-3-8b"


def _client_main(conn: Any) -> None:
    while True:
        command = conn.recv()
        if command is None:
            return
        conn.send(asyncio.run(_client_run(**command)))


async def _client_run(*, path: str, grpc_endpoint: str, http_port: int, warmup: int, requests: int,
                      concurrency: int, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
    import json

    import aiohttp
    import grpc

    from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    channel = grpc.aio.insecure_channel(grpc_endpoint)
    await channel.channel_ready()
    stub = inference_pb2_grpc.InferenceStub(channel)
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    # One connection per concurrent caller (keep-alive), as OpenAI clients pool them.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

    def prompt(i: int) -> list[int]:
        # A different first token per request: no prefix-cache hits to flatter either path.
        return [3 + (i % 90), *range(40, 40 + prompt_tokens - 1)]

    async def one(i: int) -> int:
        request = inference_pb2.GenerateRequest(model=MODEL, prompt_token_ids=prompt(i), sampling=sampling)
        if path == "grpc-complete":
            return len((await stub.Complete(request, timeout=30)).token_ids)
        if path == "grpc-generate":
            tokens = 0
            async for piece in stub.Generate(request, timeout=30):
                tokens += len(piece.token_ids)
            return tokens
        body = {"model": MODEL, "prompt": prompt(i), "max_tokens": max_tokens, "ignore_eos": True,
                "stream": path == "http-stream"}
        async with session.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            if path == "http-complete":
                return int((await response.json())["usage"]["completion_tokens"])
            chunks = 0
            async for line in response.content:
                if line.startswith(b"data: {"):
                    chunks += 1
                elif line.startswith(b"data: [DONE]"):
                    return max_tokens if chunks else 0
            return 0

    latencies: list[float] = []
    errors: list[str] = []

    async def run(total: int, record: bool) -> None:
        counter = iter(range(total))

        async def loop() -> None:
            for i in counter:
                started = time.perf_counter()
                try:
                    got = await one(i)
                except (grpc.aio.AioRpcError, RuntimeError, aiohttp.ClientError, json.JSONDecodeError) as exc:
                    errors.append(str(exc)[:200])
                    continue
                if got != max_tokens:
                    errors.append(f"got {got} tokens, wanted {max_tokens}")
                elif record:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(loop() for _ in range(concurrency)))

    try:
        await run(warmup, record=False)
        started = time.perf_counter()
        await run(requests, record=True)
        wall = time.perf_counter() - started
    finally:
        await session.close()
        await channel.close()
    return {"latencies": latencies, "wall": wall, "errors": errors[:5], "error_count": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--requests", type=int, default=0, help="measured requests per path (default 3000; quick 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight from the client")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="prompt tokens (token ids) per request")
    parser.add_argument("--stacks", action="store_true", help="compare bare HTTP stacks instead (no router)")
    args = parser.parse_args()
    requests = args.requests or (600 if args.quick else 3000)
    if args.stacks:
        from _http_stacks import compare

        print_header(f"HTTP stacks alone: {requests} requests per answer kind, concurrency {args.concurrency}")
        print(compare(max(requests, 3000), args.concurrency))
        return
    warmup = max(100, requests // 10)
    print_header(f"router CPU per request, HTTP (OpenAI) vs gRPC: sim engine x1000, {args.prompt_tokens}-token "
                 f"prompts, {args.max_tokens}-token completions, concurrency {args.concurrency}, "
                 f"{requests} requests per path")
    factory = testbed()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=_client_main, args=(child,), daemon=True)
    rows = []
    cpu_ms: dict[str, float] = {}
    try:
        sim = (*SIM_8B, "--speedup", "1000", "--max-batch-size", str(max(16, args.concurrency)))
        factory.start("d0", "decode_svc", *sim)
        factory.start("p0", "prefill_svc", *sim)
        router = factory.start("router", "router_svc", "--http-listen", "127.0.0.1:0",
                               "--local-prefill-max-prompt-tokens", str(max(16, args.prompt_tokens)))
        wait_routable(router.endpoint, MODEL)
        client.start()
        paths = [("grpc-complete", "gRPC Complete"), ("http-complete", "HTTP /v1/completions"),
                 ("grpc-generate", "gRPC Generate (stream)"), ("http-stream", "HTTP /v1/completions stream")]
        for path, label in paths:
            parent.send({"path": path, "grpc_endpoint": router.endpoint, "http_port": int(router.info["http_port"]),
                         "warmup": warmup, "requests": requests, "concurrency": args.concurrency,
                         "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens})
            # The client warms up, then measures; the router's CPU is read around the whole exchange,
            # so subtract the warm-up's share by running it as part of the window (same per-request cost).
            before = cpu_seconds(router.pid)
            result = parent.recv()
            used = cpu_seconds(router.pid) - before
            if result["error_count"]:
                raise RuntimeError(f"{label}: {result['error_count']} errors, e.g. {result['errors']}")
            per_request = used / (requests + warmup) * 1000
            cpu_ms[path] = per_request
            lat = result["latencies"]
            rows.append([label, f"{requests / result['wall']:.0f}", f"{percentile(lat, 50) * 1000:.1f}",
                         f"{percentile(lat, 99) * 1000:.1f}", f"{per_request:.2f}"])
    finally:
        parent.send(None)
        client.join(10)
        left = factory.close()
        if left:
            print(f"warning: processes left running: {left}", file=sys.stderr)
    print(table(["path", "req/s", "p50 ms", "p99 ms", "router CPU ms/req"], rows))
    print(f"\nHTTP / gRPC router CPU per request: non-streaming "
          f"{cpu_ms['http-complete'] / cpu_ms['grpc-complete']:.2f}x, streaming "
          f"{cpu_ms['http-stream'] / cpu_ms['grpc-generate']:.2f}x")


if __name__ == "__main__":
    main()
