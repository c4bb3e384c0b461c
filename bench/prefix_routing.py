"""KV-aware routing on a shared-prefix workload: TTFT, prefill work and prefix hits per policy, same run.

    .venv/bin/python bench/prefix_routing.py [--quick] [--conversations 64] [--turns 8] [--concurrency 16]
    .venv/bin/python bench/prefix_routing.py --quick --dynamo-venv /tmp/dyn/venv [--dynamo-routers kv,round-robin]
    .venv/bin/python bench/prefix_routing.py --scale-only [--workers 1000]

Real processes, one fresh fleet per policy (so each starts with cold
caches): etcd, 4 sim prefill workers and 2 sim decode workers (llama-3-8b
on one simulated A100-80GB each, speedup 1: engine time is the roofline's,
in real milliseconds, and a 1500-token prefill takes longer than the
software around it even on a busy 2-core machine) with 4096 KV blocks of 16
tokens each, and one router. A client sends multi-turn conversations: each
opens with one of 4 system prompts of 1024 tokens, and every turn's prompt
is the conversation so far (system prompt, earlier user messages and the
model's replies) plus a new user message; the run prints the share of
prompt tokens an earlier request computed (about 92% by default). The
router runs with `--local-prefill-max-prompt-tokens` 0 by default (every
prompt prefilled on a prefill worker); `--local-prefill 256` is the
router's own default, under which the prefix-aware policy prefills a prompt
on the decode worker that holds all but 256 tokens of it. Hits are counted
where the prefill ran: each sim worker reports its lifetime hit rate, and
the client knows which prompts each one prefilled.

Policies compared:
- round-robin;
- expected-time, prefix-blind (every prompt token is prefill work, less the
  worker's lifetime hit rate: the policy before the prefix index);
- expected-time with the prefix index (the default `expected-time`);
- oracle: the same, knowing every cache at once (the router adds each prompt
  it sends to its index before the worker's events confirm it) and visiting
  every worker.

Also prints the bound no router can beat: the share of prompt tokens that
some earlier request computed (one infinite cache holding everything).

`--http`: the same, over Tandem's OpenAI HTTP API with a streaming client
(synthetic replies; TTFT measured by the client); `--openai-url URL`: that
client against any OpenAI-compatible server (Dynamo's frontend, say), for a
side-by-side on the same workload.

`--dynamo-venv PATH` (ai-dynamo 1.6.1): after Tandem's policies (then run
with `--http`), the same conversations and client against NVIDIA Dynamo's
frontend, `--router-mode` kv and round-robin, over mockers shaped like
Tandem's fleet (bench/_prefix_dynamo.py: the fleets, where each hit rate
comes from). One table for all; TTFT compares only roughly (two different
simulators), the hit rate like for like.

`--scale-only`: the router's CPU per decision with the index on, in
process, for a fleet of `--workers` workers whose caches hold the same kind
of conversations: prefix lookup + policy decision, against a decision
without the index. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile, print_header, table, testbed, wait_routable
from _prefix_dynamo import Settings, add_dynamo_arguments, compare, describe, fleets, run_fleets

MODEL = "llama-3-8b"
GPU = "A100-80GB"
GPUS_PER_WORKER = 1
BLOCK = 16
PREFILL_WORKERS = 4
DECODE_WORKERS = 2
KV_BLOCKS = 4096
POLICIES = ("round-robin", "expected-time-prefix-blind", "expected-time", "oracle")


# -- the router process, with the comparison policies registered ------------------------


def router_main() -> int:
    """Runs tandem-router with `expected-time-prefix-blind` and `oracle` selectable by --policy."""
    from router_svc import pipeline as pipeline_module
    from router_svc.policies import register_policy
    from router_svc.policy import ExpectedTimePolicy, PolicyConfig, PrefixBlindExpectedTimePolicy
    from router_svc.request_events import Chosen

    class OraclePolicy(ExpectedTimePolicy):
        name = "oracle"

        def __init__(self, *, config: PolicyConfig | None = None, **kw: object) -> None:
            config = dataclasses.replace(config or PolicyConfig(), sample_size=0)
            super().__init__(config=config, **kw)  # type: ignore[arg-type]

    register_policy(PrefixBlindExpectedTimePolicy.name, PrefixBlindExpectedTimePolicy)
    register_policy(OraclePolicy.name, OraclePolicy)
    choose = pipeline_module.Pipeline._choose

    async def knowing_choose(self, job, action):
        chosen = await choose(self, job, action)
        if isinstance(chosen, Chosen) and isinstance(self.policy, OraclePolicy):
            for worker in (chosen.prefill, chosen.decode):
                if worker is not None:
                    self.view.kv.assume_stored(worker.worker_id, job.prompt)
        return chosen

    pipeline_module.Pipeline._choose = knowing_choose  # type: ignore[method-assign]
    from router_svc.__main__ import main
    return main(sys.argv[1:])


# -- the workload ------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    systems: list[list[int]]
    # Per conversation: its system prompt's index and its user messages, one per turn.
    conversations: list[tuple[int, list[list[int]]]]


def make_workload(conversations: int, turns: int, *, systems: int = 4, system_tokens: int = 1024,
                  user_tokens: tuple[int, int] = (128, 256), seed: int = 7) -> Workload:
    rng = random.Random(seed)

    def text(n: int) -> list[int]:
        return [rng.randrange(3, 256) for _ in range(n)]

    return Workload(
        systems=[text(system_tokens) for _ in range(systems)],
        conversations=[(rng.randrange(systems), [text(rng.randint(*user_tokens)) for _ in range(turns)])
                       for _ in range(conversations)])


def seen_before_bound(prompts: list[list[int]], computed: list[list[int]]) -> float:
    """Share of prompt tokens (whole blocks, never the last token) that an earlier request computed."""
    from runtime.prefix_hash import block_hashes, prefix_blocks

    seen: set[int] = set()
    hit = total = 0
    for prompt, context in zip(prompts, computed, strict=True):
        total += len(prompt)
        for h in block_hashes(prompt, BLOCK, max_blocks=prefix_blocks(len(prompt), BLOCK)):
            if h not in seen:
                break
            hit += BLOCK
        seen.update(block_hashes(context, BLOCK))
    return hit / total if total else 0.0


# -- one policy on a fresh fleet ---------------------------------------------------------


async def drive(endpoint: str, work: Workload, concurrency: int, max_tokens: int) -> dict[str, object]:
    import grpc

    from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    gate = asyncio.Semaphore(concurrency)
    records: list[tuple[int, int, int, float, str, bool]] = []  # (order, prompt, cached, ttft ms, prefilled on, local)
    order = iter(range(1 << 30))
    sent: dict[int, tuple[list[int], list[int]]] = {}
    errors: list[str] = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def conversation(system: int, users: list[list[int]]) -> None:
            async with gate:
                history = list(work.systems[system])
                for user in users:
                    prompt = [*history, *user]
                    n = next(order)
                    try:
                        reply = await stub.Complete(inference_pb2.GenerateRequest(
                            model=MODEL, prompt_token_ids=prompt, sampling=sampling), timeout=120)
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                        return
                    out = list(reply.token_ids)
                    sent[n] = (prompt, [*prompt, *out])
                    route = reply.route
                    records.append((n, len(prompt), reply.usage.cached_prompt_tokens, reply.timings.ttft_ms,
                                    route.decode_worker_id if route.local_prefill else route.prefill_worker_id,
                                    route.local_prefill))
                    history = [*prompt, *out]

        started = time.perf_counter()
        await asyncio.gather(*(conversation(s, users) for s, users in work.conversations))
        wall = time.perf_counter() - started
    ordered = [sent[n] for n in sorted(sent)]
    return {"records": records, "wall": wall, "errors": errors,
            "bound": seen_before_bound([p for p, _ in ordered], [c for _, c in ordered])}


async def drive_openai(url: str, model: str, work: Workload, concurrency: int, max_tokens: int
                       ) -> dict[str, object]:
    """The same conversations against any OpenAI-compatible /v1/completions server, streamed.

    Replies in the history are synthetic (the same for every server, whatever it generates), so every
    server sees the same prompts. The client is bench/_openai_load.py's (raw HTTP/1.1, one keep-alive
    connection per conversation in flight, no delayed ACKs). TTFT is the client's (first streamed
    choice); cached tokens are what the server reports in usage.prompt_tokens_details.
    """
    from urllib.parse import urlsplit

    from _openai_load import Connection, LoadError, complete

    where = urlsplit(url)
    host, port = where.hostname or "127.0.0.1", where.port or 80
    gate = asyncio.Semaphore(concurrency)
    records: list[tuple[int, int, int, float, str, bool]] = []
    sent: list[tuple[list[int], list[int]]] = []
    errors: list[str] = []

    async def conversation(index: int, system: int, users: list[list[int]]) -> None:
        async with gate:
            conn = await Connection.open(host, port)
            try:
                history = list(work.systems[system])
                for turn, user in enumerate(users):
                    prompt = [*history, *user]
                    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "ignore_eos": True}
                    try:
                        if not conn.reusable:
                            await conn.close()
                            conn = await Connection.open(host, port)
                        async with asyncio.timeout(300):
                            answer = await complete(conn, body)
                    except (LoadError, OSError, TimeoutError, ValueError, KeyError) as exc:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                        return
                    reply = [3 + (index * 7 + turn * 13 + k) % 250 for k in range(max_tokens)]
                    records.append((len(sent), len(prompt), answer.cached_tokens, answer.ttft_s * 1000, "", False))
                    sent.append((prompt, [*prompt, *reply]))
                    history = [*prompt, *reply]
            finally:
                await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(conversation(i, s, users) for i, (s, users) in enumerate(work.conversations)))
    wall = time.perf_counter() - started
    return {"records": records, "wall": wall, "errors": errors, "hit_rates": None,
            "bound": seen_before_bound([p for p, _ in sent], [c for _, c in sent])}


def hit_rates(endpoints: dict[str, str]) -> dict[str, float]:
    """Each worker's lifetime prefix-cache hit rate (prompt tokens served from cache over those it prefilled)."""
    import grpc

    from tandem.v1 import worker_pb2, worker_pb2_grpc

    rates = {}
    for name, endpoint in endpoints.items():
        with grpc.insecure_channel(endpoint) as channel:
            report = worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
            rates[name] = report.prefix_cache_hit_rate
    return rates


def run_policy(policy: str, work: Workload, args: argparse.Namespace) -> dict[str, object]:
    bed = testbed()
    try:
        sim = ("--engine", "sim", "--model", MODEL, "--gpu-type", GPU, "--gpu-count", str(GPUS_PER_WORKER),
               "--speedup", str(args.speedup), "--kv-blocks", str(KV_BLOCKS), "--max-batch-size", "64")
        for i in range(PREFILL_WORKERS):
            bed.start(f"p{i}", "prefill_svc", *sim, wait=False)
        for i in range(DECODE_WORKERS):
            bed.start(f"d{i}", "decode_svc", *sim, wait=False)
        for child in bed.children.values():
            child.wait_ready(120)
        python = (sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                  "import prefix_routing; sys.exit(prefix_routing.router_main())")
        http = ("--http-listen", "127.0.0.1:0") if args.http else ()
        router = bed.start("router", "router_svc", "--policy", policy,
                           "--local-prefill-max-prompt-tokens", str(args.local_prefill), *http, python=python)
        wait_routable(router.endpoint, MODEL, prefill=PREFILL_WORKERS, decode=DECODE_WORKERS, timeout=60.0)
        time.sleep(1.0)  # every load stream's first report (and snapshot) in
        if args.http:
            url = f"http://127.0.0.1:{router.info['http_port']}"
            out = asyncio.run(drive_openai(url, MODEL, work, args.concurrency, args.max_tokens))
        else:
            out = asyncio.run(drive(router.endpoint, work, args.concurrency, args.max_tokens))
            out["hit_rates"] = hit_rates({name: c.endpoint for name, c in bed.workers().items()})
        return out
    finally:
        left = bed.close()
        if left:
            print(f"warning: still running after close: {left}", file=sys.stderr)


def summarize(policy: str, out: dict[str, object]) -> tuple[list[str], dict[str, float]]:
    records = out["records"]
    rates = out["hit_rates"]
    assert isinstance(records, list)
    ttft = [r[3] for r in records]
    prompt = sum(r[1] for r in records)
    # Prompt tokens each worker prefilled, times its hit rate over exactly those prompts.
    looked_up: dict[str, int] = {}
    for r in records:
        looked_up[r[4]] = looked_up.get(r[4], 0) + r[1]
    known = True
    if isinstance(rates, dict):
        cached = round(sum(rates.get(w, 0.0) * n for w, n in looked_up.items()))
    elif "cached" in out:  # a Dynamo fleet: its own source, or none
        known = out["cached"] is not None
        cached = int(out["cached"] or 0)  # type: ignore[call-overload]
    else:  # over HTTP: what the server reports (remote prefills only, for Tandem)
        cached = sum(r[2] for r in records)
    hit = cached / prompt if prompt else 0.0
    per_worker: dict[str, int] = {}
    for r in records:
        per_worker[r[4]] = per_worker.get(r[4], 0) + 1
    spread = " ".join(f"{w}:{per_worker[w]}" for w in sorted(per_worker))
    local = str(sum(1 for r in records if r[5]))
    if not all(r[4] for r in records):  # an HTTP client learns neither
        spread = local = "-"
    figures = {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "hit": hit,
               "computed": float(prompt - cached), "n": float(len(records))}
    row = [policy, str(len(records)), f"{figures['p50']:.1f}", f"{figures['p99']:.1f}",
           f"{prompt - cached:,}" if known else "-", f"{hit:.1%}" if known else "-", local, spread,
           str(len(out["errors"]))]  # type: ignore[arg-type]
    if not known:
        figures["hit"] = figures["computed"] = float("nan")
    return row, figures


# -- router CPU per decision at fleet scale ------------------------------------------------


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scale(workers: int, decisions: int, seed: int = 3) -> None:
    from router_svc.candidates import FleetView, Load, Role, make_candidate
    from router_svc.policy import ExpectedTimePolicy, PolicyConfig, PrefixBlindExpectedTimePolicy, RouteRequest
    from router_svc.prefix_index import KvIndex, KvUpdate
    from runtime.prefix_hash import block_hashes

    rng = random.Random(seed)
    work = make_workload(conversations=workers * 4, turns=4, seed=seed)
    prompts: list[list[int]] = []
    for system, users in work.conversations:
        history = list(work.systems[system])
        for user in users:
            history = [*history, *user]
            prompts.append(list(history))
            history.extend(rng.randrange(3, 256) for _ in range(32))
    prefill_n = workers // 2
    candidates = []
    rss_before = _rss_mb()
    index = KvIndex()
    for i in range(workers):
        prefill = i < prefill_n
        worker_id = f"{'p' if prefill else 'd'}{i:05}"
        candidates.append(make_candidate(
            worker_id=worker_id, role=Role.PREFILL if prefill else Role.DECODE, model=MODEL, endpoint=f"h{i}:1",
            host=f"h{i}", gpu_type=GPU, gpu_count=GPUS_PER_WORKER, kv_blocks_total=KV_BLOCKS, kv_block_size=BLOCK,
            max_batch_size=64,
            load=Load(queued_prefill_tokens=rng.randrange(0, 4000), active_sequences=rng.randrange(0, 32),
                      kv_blocks_used=rng.randrange(0, 2000), kv_blocks_total=KV_BLOCKS, kv_block_size=BLOCK,
                      max_batch_size=64, received_at=0.0)))
        # Each worker holds the conversations routed to it: 3000 distinct blocks, as a warm cache would.
        held: dict[int, None] = {}
        while len(held) < 3000:
            held.update(dict.fromkeys(block_hashes(rng.choice(prompts), BLOCK)))
        index.apply(worker_id, MODEL, prefill, KvUpdate(BLOCK, 0, 0, stored=list(held)[:3000], snapshot=True))
    index_mb = _rss_mb() - rss_before
    fleet = FleetView.of(candidates)
    config = PolicyConfig(inflight_hold_s=0)
    sample = [rng.choice(prompts) for _ in range(decisions)]
    rows = []
    timings: dict[str, float] = {}
    for label, policy, lookup in (
            ("expected-time, prefix-blind (no lookup)", PrefixBlindExpectedTimePolicy(config=config), False),
            ("expected-time + prefix index (lookup + decision)", ExpectedTimePolicy(config=config), True)):
        hits = 0
        cpu = time.process_time()
        for prompt in sample:
            cached = index.lookup(MODEL, prompt) if lookup else None
            decision = policy.choose(RouteRequest(model=MODEL, prompt_tokens=len(prompt), max_tokens=32,
                                                  cached=cached), fleet, 1.0)
            hits += decision.estimates.prefix_hit_tokens > 0
        per = (time.process_time() - cpu) * 1000 / decisions
        timings[label] = per
        rows.append([label, f"{per:.3f}", f"{hits / decisions:.0%}"])
    lookup_cpu = time.process_time()
    for prompt in sample:
        index.lookup(MODEL, prompt)
    lookup_ms = (time.process_time() - lookup_cpu) * 1000 / decisions
    avg_blocks = sum(len(p) // BLOCK for p in sample) / len(sample)
    print(f"\nrouter CPU per decision, in process: {workers} workers in view ({prefill_n} prefill), "
          f"{index.entries:,} (worker, block) entries in the index (about {index_mb:.0f} MB with the candidates), "
          f"prompts of {avg_blocks:.0f} blocks on average")
    print(table(["decision", "CPU ms/decision", "decisions pricing a cache hit"], rows))
    print(f"prefix lookup alone: {lookup_ms:.3f} ms per prompt; the index adds "
          f"{timings[rows[1][0]] - timings[rows[0][0]]:+.3f} ms per decision")


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer conversations (about a minute in all)")
    parser.add_argument("--conversations", type=int, default=0, help="conversations per policy (default 64; quick 24)")
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation")
    parser.add_argument("--concurrency", type=int, default=16, help="conversations in flight")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--user-tokens", default="64,192", help="MIN,MAX tokens of a user turn")
    parser.add_argument("--local-prefill", type=int, default=0,
                        help="the router's --local-prefill-max-prompt-tokens (its default is 256)")
    parser.add_argument("--speedup", type=float, default=1.0, help="sim engine speedup")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies to run")
    parser.add_argument("--http", action="store_true",
                        help="drive Tandem's OpenAI HTTP API with the --openai-url client (same replies, streamed)")
    parser.add_argument("--openai-url", default="",
                        help="run the workload against this OpenAI-compatible server only (e.g. Dynamo's frontend)")
    parser.add_argument("--openai-model", default="tiny-llama", help="model name for --openai-url")
    parser.add_argument("--scale-only", action="store_true", help="only the in-process CPU measurement")
    parser.add_argument("--workers", type=int, default=1000, help="workers in view for the CPU measurement")
    parser.add_argument("--decisions", type=int, default=2000, help="decisions timed per variant")
    add_dynamo_arguments(parser)
    args = parser.parse_args()
    if args.dynamo_venv:
        args.http = True  # the same client for both systems
    if args.scale_only:
        print_header(f"prefix-aware routing: router CPU per decision at {args.workers} workers")
        scale(args.workers, args.decisions)
        return
    conversations = args.conversations or (24 if args.quick else 64)
    low, high = (int(x) for x in args.user_tokens.split(","))
    work = make_workload(conversations, args.turns, user_tokens=(low, high))
    if args.openai_url:
        print_header(f"prefix-aware routing: {conversations} conversations x {args.turns} turns against "
                     f"{args.openai_url} (synthetic replies)")
        out = asyncio.run(drive_openai(args.openai_url, args.openai_model, work, args.concurrency, args.max_tokens))
        row, _ = summarize(args.openai_url, out)
        print(table(["server", "requests", "TTFT p50 ms", "TTFT p99 ms", "prefill tokens computed",
                     "prefix hit rate", "local prefills", "prefills per worker", "errors"], [row]))
        print(f"prompt tokens an earlier request computed: {float(out['bound']):.1%}")  # type: ignore[arg-type]
        return
    print_header(f"prefix-aware routing: {conversations} conversations x {args.turns} turns, 4 system prompts of "
                 f"1024 tokens, {low}-{high}-token user turns, {args.max_tokens}-token replies, concurrency "
                 f"{args.concurrency}, local prefill up to {args.local_prefill} uncached tokens; "
                 f"{PREFILL_WORKERS} prefill + {DECODE_WORKERS} decode sim workers "
                 f"({MODEL}, {GPUS_PER_WORKER}x {GPU}, {KV_BLOCKS} KV blocks, speedup {args.speedup:g})"
                 + (", over HTTP (streamed)" if args.http else ""))
    dynamo = fleets(args.dynamo_routers, args.dynamo_fleets) if args.dynamo_venv else []
    settings = Settings(MODEL, args.speedup, BLOCK, KV_BLOCKS, 64)
    if dynamo:
        print("\n".join(describe(settings)), flush=True)
    load_start = os.getloadavg()
    rows = []
    figures: dict[str, dict[str, float]] = {}
    bound = 0.0
    for policy in args.policies.split(","):
        out = run_policy(policy, work, args)
        if out["errors"]:
            print(f"  {policy}: {len(out['errors'])} errors, e.g. {out['errors'][:3]}", file=sys.stderr)  # type: ignore[arg-type,index]
        row, figures[policy] = summarize(policy, out)
        rows.append(row)
        bound = float(out["bound"])  # type: ignore[arg-type]
        print(f"  measured: {policy}", file=sys.stderr, flush=True)
    notes: list[str] = []
    if dynamo:
        rows = [[f"Tandem {row[0]}", *row[1:], "answers (prefill worker's hits)"] for row in rows]

        def drive(url: str) -> dict[str, object]:
            return asyncio.run(drive_openai(url, MODEL, work, args.concurrency, args.max_tokens))

        dyn_rows, dyn_figures, notes = run_fleets(dynamo, settings, args, drive, summarize)
        rows += dyn_rows
        figures.update(dyn_figures)
    headers = ["policy", "requests", "TTFT p50 ms", "TTFT p99 ms", "prefill tokens computed", "prefix hit rate",
               "local prefills", "prefills per worker", "errors"]
    print(table([*headers, "hit rate from"] if dynamo else headers, rows))
    print(f"prompt tokens an earlier request computed (the bound no router beats): {bound:.1%}")
    for note in notes:
        print(note)
    if dynamo:
        print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in load_start)} at start, "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at end; all processes share "
              f"{len(os.sched_getaffinity(0))} cores")
    aware, blind, oracle = (figures.get(p) for p in ("expected-time", "expected-time-prefix-blind", "oracle"))
    if aware and blind:
        print(f"\nprefix-aware vs prefix-blind expected-time: TTFT p50 {blind['p50'] / aware['p50']:.2f}x better, "
              f"p99 {blind['p99'] / aware['p99']:.2f}x, "
              f"prefill tokens computed {blind['computed'] / aware['computed']:.2f}x fewer")
    if aware and oracle:
        print(f"hit rate: prefix-aware {aware['hit']:.1%} vs oracle {oracle['hit']:.1%} "
              f"({(oracle['hit'] - aware['hit']) * 100:+.1f} points to the oracle)")
    if dynamo:
        print(compare(figures))


if __name__ == "__main__":
    main()
