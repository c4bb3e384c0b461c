"""Registry and routing reaction times, etcd write load, and decision time at 1000 workers.

    .venv/bin/python bench/registry_scale.py [--quick] [--trials 20] [--idle 100,1000] [--window 10]

1. Lifecycle, against real processes (etcd, a router with the round-robin
   policy, one steady sim decode worker; lease TTL 2 s). Requests flow
   through the router all along (4 in flight). Each trial starts one more sim
   decode worker, then SIGKILLs it, and times:
   - registered (its READY record seen by a watch in this process) -> the
     first request the router sends it (end of that request);
   - SIGKILL -> its record gone from a RegistryView (lease expiry);
   - SIGKILL -> the router no longer chooses it: start of the last request
     that still tried it (the router's suspect list excludes a worker after
     its first failed call, long before its lease expires), and how many
     requests paid a retry or a migration for it; failed requests are counted.
2. etcd writes with N idle registrants: N LeaseSessions in helper processes,
   each with its own lease (TTL 5 s, keepalive every TTL/3) and a
   WorkerRecord, which is what a worker's registration does, without N
   processes. etcd's own /metrics counters over a fixed window: raft
   proposals, puts, txns, lease renewals. Baseline: N / (TTL/3) keepalives/s.
3. Policy decision time with 1000 sim workers in view (250 prefill, 750
   decode, H100/A100/L40S, random loads), in process: `policy.choose` per
   policy and the FleetView rebuild the router does when the registry or the
   loads change. Baseline: round-robin.

Prints tables, then, last, the ratios. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import re
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SIM_8B, percentile, print_header, table, testbed

from tests.support.testbed import Testbed

if TYPE_CHECKING:
    from registry.etcd_client import EtcdClient
    from registry.keys import Keys
    from router_svc.candidates import FleetView

MODEL = "llama-3-8b"
TRIAL_TTL = 2
IDLE_TTL = 5
METRICS = ("etcd_server_proposals_committed_total", "etcd_mvcc_put_total", "etcd_mvcc_txn_total",
           "etcd_mvcc_delete_total", "etcd_debugging_lease_renewed_total", "etcd_debugging_lease_granted_total",
           "etcd_disk_wal_fsync_duration_seconds_count")


def _ms(values: list[float]) -> tuple[str, str]:
    return f"{percentile(values, 50) * 1000:.0f}", f"{percentile(values, 99) * 1000:.0f}"


# -- 1. lifecycle trials ------------------------------------------------------------------


@dataclass
class Sent:
    started: float
    ended: float
    decode_worker_id: str
    retried: bool
    error: str = ""


class Traffic:
    """Requests through the router, `concurrency` in flight, every outcome kept. Stops on `stop()`."""

    def __init__(self, endpoint: str, concurrency: int = 4) -> None:
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.sent: list[Sent] = []
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        import grpc

        from tandem.v1 import inference_pb2_grpc

        self._channel = grpc.aio.insecure_channel(self.endpoint)
        await self._channel.channel_ready()
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._tasks = [asyncio.create_task(self._loop(i)) for i in range(self.concurrency)]

    async def _loop(self, n: int) -> None:
        import grpc

        from tandem.v1 import common_pb2, inference_pb2

        sampling = common_pb2.SamplingParams(max_tokens=8, ignore_eos=True)
        i = 0
        while not self._stop:
            i += 1
            started = time.monotonic()
            try:
                reply = await self._stub.Complete(inference_pb2.GenerateRequest(
                    model=MODEL, prompt_token_ids=[3 + (i % 90), 40, 41, 42], sampling=sampling), timeout=30)
                self.sent.append(Sent(started, time.monotonic(), reply.route.decode_worker_id,
                                      reply.route.retries > 0 or reply.route.migrations > 0))
            except grpc.aio.AioRpcError as exc:
                self.sent.append(Sent(started, time.monotonic(), "", True, f"{exc.code().name}: {exc.details()}"))

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._channel.close()


async def _lifecycle(factory: Testbed, trials: int) -> dict[str, list[float]]:
    from registry.etcd_client import EtcdClient, EtcdSettings
    from registry.keys import Keys, Kind
    from registry.view import RegistryView
    from tandem.v1 import registry_pb2

    sim = (*SIM_8B, "--speedup", "1000")
    factory.start("d-steady", "decode_svc", *sim)
    router = factory.start("router", "router_svc", "--policy", "round-robin")
    out: dict[str, list[float]] = {"first": [], "gone": [], "unchosen": [], "paid": [], "failed": []}
    async with EtcdClient(EtcdSettings.parse(factory.etcd.endpoint)) as client:
        view = RegistryView(client, Keys(), kinds=[Kind.WORKER])
        view.start()
        await view.wait_synced(10)
        ready_at: dict[str, float] = {}
        gone_at: dict[str, float] = {}

        async def watch() -> None:
            async for change in view.changes():
                now = time.monotonic()
                if change.new is None:
                    gone_at.setdefault(change.name, now)
                elif change.new.record.state == registry_pb2.WORKER_STATE_READY:
                    ready_at.setdefault(change.name, now)

        watcher = asyncio.create_task(watch())
        traffic = Traffic(router.endpoint)
        await traffic.start()
        try:
            for k in range(trials):
                name = f"v{k}"
                victim = factory.start(name, "decode_svc", *sim, wait=False)
                await _until(lambda name=name: name in ready_at, 60, f"{name} never became READY:\n{victim.log_tail()}")
                await _until(lambda name=name: any(s.decode_worker_id == name for s in traffic.sent), 30,
                             f"the router never routed to {name}")
                first = min(s.ended for s in traffic.sent if s.decode_worker_id == name)
                out["first"].append(first - ready_at[name])
                mark = len(traffic.sent)
                killed = time.monotonic()
                victim.kill()
                await _until(lambda name=name: name in gone_at, 30, f"{name} never left the view")
                out["gone"].append(gone_at[name] - killed)
                # Let the requests started before the record vanished finish before judging them.
                settle = time.monotonic()
                await _until(lambda name=name, mark=mark, settle=settle: time.monotonic() - settle > 0.2 and any(
                    s.started > gone_at[name] for s in traffic.sent[mark:]), 30, "traffic stopped")
                after = [s for s in traffic.sent[mark:] if s.ended >= killed]
                tried = [s for s in after if s.retried]
                out["unchosen"].append(max([0.0, *(s.started - killed for s in tried)]))
                out["paid"].append(len(tried))
                out["failed"].append(sum(1 for s in after if s.error))
                print(f"  trial {k + 1}/{trials}", file=sys.stderr, flush=True)
        finally:
            await traffic.stop()
            watcher.cancel()
            await view.close()
    errors = [s.error for s in traffic.sent if s.error]
    if errors:
        print(f"  {len(errors)} failed requests, e.g. {errors[:3]}", file=sys.stderr)
    out["total_requests"] = [float(len(traffic.sent))]
    return out


async def _until(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        await asyncio.sleep(0.002)


# -- 2. etcd write load -------------------------------------------------------------------


def _registrants(conn, endpoint: str, first: int, count: int) -> None:
    asyncio.run(_hold_sessions(conn, endpoint, first, count))


async def _hold_sessions(conn, endpoint: str, first: int, count: int) -> None:
    from registry.etcd_client import EtcdClient, EtcdSettings
    from registry.keys import Keys
    from registry.session import LeaseSession
    from registry.store import Registry
    from tandem.v1 import common_pb2, registry_pb2

    loop = asyncio.get_running_loop()
    async with EtcdClient(EtcdSettings.parse(endpoint)) as client:
        registry = Registry(client, Keys())
        sessions = []
        for i in range(first, first + count):
            session = LeaseSession(client, ttl=IDLE_TTL, name=f"idle-{i}")
            session.start()
            sessions.append(session)
        await asyncio.gather(*(s.wait_alive(60) for s in sessions))
        for i, session in enumerate(sessions, start=first):
            await registry.register_worker(session, registry_pb2.WorkerRecord(
                worker_id=f"idle-{i}", role=common_pb2.ROLE_DECODE, model="idle-sim", endpoint=f"127.0.0.1:{i + 1}",
                node=f"idle-node-{i // 8}", gpu_type="H100-SXM", gpu_count=1, engine="sim", simulated=True,
                state=registry_pb2.WORKER_STATE_READY,
                capacity=registry_pb2.WorkerCapacity(kv_blocks_total=4000, kv_block_size_tokens=16,
                                                     max_batch_size=64)))
        conn.send(("ready", time.process_time()))
        await loop.run_in_executor(None, conn.recv)
        cpu = time.process_time()
        await asyncio.gather(*(s.close() for s in sessions))
        conn.send(("closed", cpu))


def _scrape(url: str) -> dict[str, float]:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    found = {}
    for name in METRICS:
        match = re.search(rf"^{name} ([0-9.e+]+)$", body, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def _write_load(endpoint: str, url: str, count: int, window: float, procs: int) -> tuple[dict[str, float], float]:
    """Per-second deltas of etcd's counters with `count` idle sessions, and the sessions' CPU seconds/s."""
    ctx = mp.get_context("spawn")
    pipes, children = [], []
    per = -(-count // procs)
    try:
        for p in range(procs):
            first, n = p * per, min(per, count - p * per)
            if n <= 0:
                break
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_registrants, args=(child, endpoint, first, n), daemon=True)
            proc.start()
            pipes.append(parent)
            children.append(proc)
        cpu_start = [pipe.recv()[1] for pipe in pipes]
        time.sleep(IDLE_TTL / 3 + 0.5)  # let every session reach its steady keepalive rhythm
        before, t0 = _scrape(url), time.monotonic()
        time.sleep(window)
        after, t1 = _scrape(url), time.monotonic()
        for pipe in pipes:
            pipe.send("close")
        cpu_end = [pipe.recv()[1] for pipe in pipes]
    finally:
        for proc in children:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    rates = {name: (after[name] - before[name]) / (t1 - t0) for name in METRICS}
    # The sessions' CPU over the window and the settle time (an upper bound per second).
    cpu_rate = sum(e - s for s, e in zip(cpu_start, cpu_end, strict=True)) / (t1 - t0 + IDLE_TTL / 3 + 0.5)
    return rates, cpu_rate


# -- 4. registry flood ---------------------------------------------------------------------


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _cpu_rate(pid: int, window: float) -> float:
    start = _proc_cpu_s(pid)
    await asyncio.sleep(window)
    return (_proc_cpu_s(pid) - start) / window


async def _flood(factory: Testbed, count: int, window: float) -> dict[str, float]:
    """`count` extra worker records (STARTING, as a large fleet registering; endpoints on closed local ports)
    written under one lease, then deleted by revoking it, with requests flowing through the router to its one
    real worker all along. The router's view is read from its metrics (tandem_router_view_workers)."""
    from registry.etcd_client import EtcdClient, EtcdSettings
    from registry.keys import Keys

    sim = (*SIM_8B, "--speedup", "1000")
    factory.start("flood-steady", "decode_svc", *sim)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    router = factory.start("flood-router", "router_svc", "--policy", "expected-time",
                           "--metrics-listen", f"127.0.0.1:{metrics_port}")
    pid = router.pid
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    out: dict[str, float] = {"count": count}
    keys = Keys()
    async with EtcdClient(EtcdSettings.parse(factory.etcd.endpoint, timeout=30.0)) as client:

        async def gauge(name: str) -> float:
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(metrics_url, timeout=10).read().decode())
            found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
            return float(found.group(1)) if found else -1.0

        async def known_workers() -> float:
            return await gauge("tandem_router_view_workers")

        await _until_async(known_workers, lambda n: n >= 1, 60, "the router never saw its worker")
        await asyncio.sleep(2.0)
        out["cpu_before"] = await _cpu_rate(pid, window)

        traffic = Traffic(router.endpoint)
        await traffic.start()
        # Memory is compared under the same traffic before and after: requests have buffers of their own.
        await asyncio.sleep(3.0)
        out["rss_before"] = _proc_rss_mib(pid)
        lease, _ = await client.grant(600)
        t0 = time.monotonic()
        await _put_flood(client, keys, count, lease)
        out["write_s"] = time.monotonic() - t0
        await _until_async(known_workers, lambda n: n == count + 1, 120, "the router never saw the flood")
        out["seen_s"] = time.monotonic() - t0
        out["streams_flooded"] = await gauge("tandem_router_load_streams")
        mark = len(traffic.sent)
        await asyncio.sleep(window)
        out["rss_flooded"] = _proc_rss_mib(pid)
        out["cpu_flooded"] = await _cpu_rate(pid, window)
        revoked = time.monotonic()
        await client.revoke(lease, timeout=60)
        await _until_async(known_workers, lambda n: n == 1, 120, "the router never forgot the flood")
        out["converged_s"] = time.monotonic() - revoked
        during = traffic.sent[mark:]
        await asyncio.sleep(5.0)  # the router returns freed memory once deletions have stopped for 2 s
        out["rss_after"] = _proc_rss_mib(pid)
        await traffic.stop()
        out["served_during"] = sum(1 for s in during if not s.error)
        out["failed_during"] = sum(1 for s in during if s.error)
        await asyncio.sleep(5.0)
        out["cpu_after"] = await _cpu_rate(pid, window)
        # A second flood: is what stays after the first a high-water mark, or a leak that grows each time?
        lease, _ = await client.grant(600)
        await _put_flood(client, keys, count, lease)
        await _until_async(known_workers, lambda n: n == count + 1, 120, "the router never saw the second flood")
        await client.revoke(lease, timeout=60)
        await _until_async(known_workers, lambda n: n == 1, 120, "the router never forgot the second flood")
        await asyncio.sleep(10.0)
        out["rss_after_second"] = _proc_rss_mib(pid)
    return out


async def _put_flood(client: EtcdClient, keys: Keys, count: int, lease: int) -> None:
    from registry.records import encode
    from tandem.v1 import common_pb2, registry_pb2

    for first in range(0, count, 500):
        await asyncio.gather(*(client.put(keys.worker(f"flood-{i:05d}"), encode(registry_pb2.WorkerRecord(
            worker_id=f"flood-{i:05d}", role=common_pb2.ROLE_DECODE, model=MODEL,
            endpoint=f"127.0.0.1:{1 + i % 1000}", node=f"flood-node-{i // 8}", host=f"flood-host-{i // 8}",
            gpu_type="H100-SXM", gpu_count=1, engine="sim", simulated=True,
            state=registry_pb2.WORKER_STATE_STARTING)), lease=lease)
            for i in range(first, min(count, first + 500))))


async def _until_async(probe, accept, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if accept(await probe()):
                return
        except Exception:  # a busy router may time out: keep asking until the deadline
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        await asyncio.sleep(0.05)


# -- 3. decision time ---------------------------------------------------------------------


def _decision_times(workers: int, repeats: int) -> list[list[str]]:
    from router_svc.candidates_pb import fleet_view_from_pb, load_from_pb
    from router_svc.costmodel import ModelShape
    from router_svc.policies import create_policy, policy_names
    from router_svc.policy import RouteRequest
    from tandem.v1 import common_pb2, registry_pb2, worker_pb2

    rng = random.Random(7)
    gpus = ("H100-SXM", "A100-80GB", "L40S")
    records, loads = [], {}
    for i in range(workers):
        role = common_pb2.ROLE_PREFILL if i % 4 == 0 else common_pb2.ROLE_DECODE
        wid = f"w{i:04d}"
        records.append(registry_pb2.WorkerRecord(
            worker_id=wid, role=role, model=MODEL, endpoint=f"10.0.{i // 250}.{i % 250}:50051", node=f"n{i // 8}",
            host=f"h{i // 8}", gpu_type=gpus[i % 3], gpu_count=1, engine="sim", simulated=True,
            state=registry_pb2.WORKER_STATE_READY,
            capacity=registry_pb2.WorkerCapacity(kv_blocks_total=20000, kv_block_size_tokens=16, max_batch_size=256)))
        loads[wid] = load_from_pb(worker_pb2.LoadReport(
            worker_id=wid, queued_prefill_tokens=rng.randrange(0, 20000), active_requests=rng.randrange(0, 64),
            active_sequences=rng.randrange(0, 200), kv_blocks_used=rng.randrange(0, 18000), kv_blocks_total=20000,
            kv_block_size_tokens=16, max_batch_size=256, prefix_cache_hit_rate=rng.random() * 0.5),
            received_at=time.monotonic())
    rebuild = []
    for _ in range(max(5, repeats // 50)):
        t = time.perf_counter()
        view = fleet_view_from_pb(records, loads=loads)
        rebuild.append(time.perf_counter() - t)
    shape = ModelShape()
    requests = {"disaggregated (prompt 2000)": RouteRequest(model=MODEL, prompt_tokens=2000, max_tokens=200,
                                                            shape=shape),
                "local (prompt 100)": RouteRequest(model=MODEL, prompt_tokens=100, max_tokens=200, shape=shape)}
    rows = [[f"FleetView from scratch ({workers} records + loads)", "-", f"{percentile(rebuild, 50) * 1e3:.3f}",
             f"{percentile(rebuild, 99) * 1e3:.3f}"]]
    rows += _pool_update_times(list(view), repeats)
    # Steady state: 1000 requests/s, and each worker's load report (every 50 ms) shows what the router
    # sent it 100 ms earlier (the in-flight ledger holds only the recent assignments). Burst: every
    # decision at one instant with no report since, so the ledger holds assignments for most workers.
    for name in policy_names():
        for label, request in requests.items():
            for mode in ("steady", "burst"):
                policy = create_policy(name)
                times = []
                start = time.monotonic()
                for i in range(repeats):
                    now = start if mode == "burst" else start + i * 1e-3
                    if mode == "steady" and i % 50 == 0:
                        view = _reported(view, now - 0.1)
                    t = time.perf_counter()
                    policy.choose(request, view, now)
                    times.append(time.perf_counter() - t)
                rows.append([f"choose: {name} ({mode})", label, f"{percentile(times, 50) * 1e3:.3f}",
                             f"{percentile(times, 99) * 1e3:.3f}"])
    return rows


def _reported(view: FleetView, at: float) -> FleetView:
    """`view` with every worker's load report received at `at` (figures unchanged)."""
    import dataclasses

    from router_svc.candidates import FleetView

    return FleetView.of(c.with_load(dataclasses.replace(c.load, received_at=at)) if c.load else c for c in view)


def _pool_update_times(candidates: list, repeats: int) -> list[list[str]]:
    """What the router's live view pays per change: one load report (a worker's figures change in place),
    a batch of 50 reports applied at once, and a worker joining (the model's pool rebuilt)."""
    import dataclasses

    from router_svc.candidates import ModelPoolBuilder

    builder = ModelPoolBuilder()
    for c in candidates:
        builder.put(c)
    builder.build()
    rng = random.Random(3)
    one, batch, join = [], [], []
    for _ in range(repeats):
        c = rng.choice(candidates)
        changed = dataclasses.replace(c, load=dataclasses.replace(c.load, active_sequences=rng.randrange(0, 200)))
        t = time.perf_counter()
        builder.put(changed)
        builder.build()
        one.append(time.perf_counter() - t)
    for _ in range(max(5, repeats // 20)):
        picked = rng.sample(candidates, 50)
        t = time.perf_counter()
        for c in picked:
            builder.put(dataclasses.replace(c, load=dataclasses.replace(c.load, kv_blocks_used=rng.randrange(0, 9000))))
        builder.build()
        batch.append(time.perf_counter() - t)
    for i in range(max(5, repeats // 20)):
        newcomer = dataclasses.replace(candidates[0], worker_id=f"zz-new-{i}")
        t = time.perf_counter()
        builder.put(newcomer)
        builder.build()
        join.append(time.perf_counter() - t)
    return [[label, "-", f"{percentile(v, 50) * 1e3:.3f}", f"{percentile(v, 99) * 1e3:.3f}"] for label, v in (
        ("pool: 1 load report applied", one), ("pool: 50 load reports applied at once", batch),
        ("pool: a worker joins (rebuild)", join))]


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 trials, 5 s windows")
    parser.add_argument("--trials", type=int, default=0, help="worker start/kill trials (default 20; quick 5)")
    parser.add_argument("--idle", default="100,1000", help="idle registrant counts, comma-separated")
    parser.add_argument("--window", type=float, default=0.0, help="etcd metrics window, seconds (default 10; quick 5)")
    parser.add_argument("--registrant-procs", type=int, default=2, help="processes holding the idle sessions")
    parser.add_argument("--workers", type=int, default=1000, help="workers in view for the decision time")
    parser.add_argument("--flood", type=int, default=10000, help="records in the registry flood (0: skip it)")
    parser.add_argument("--only", choices=("lifecycle", "writes", "decisions", "flood"), action="append",
                        help="run only these parts (repeatable; default all)")
    args = parser.parse_args()
    parts = set(args.only or ("lifecycle", "writes", "decisions", "flood"))
    if not args.flood:
        parts.discard("flood")
    trials = args.trials or (5 if args.quick else 20)
    window = args.window or (5.0 if args.quick else 10.0)
    idle_counts = [int(x) for x in args.idle.split(",") if x]

    print_header(f"registry: {trials} worker start/SIGKILL trials (lease TTL {TRIAL_TTL} s), etcd writes with "
                 f"{'/'.join(map(str, idle_counts))} idle registrants (TTL {IDLE_TTL} s), "
                 f"decisions over {args.workers} workers, a flood of {args.flood} records; parts: "
                 f"{', '.join(sorted(parts))}")
    life: dict[str, list[float]] = {}
    writes: dict[int, dict[str, float]] = {}
    write_rows: list[list[str]] = []
    flood: dict[str, float] = {}
    factory = testbed(lease_ttl=TRIAL_TTL)
    try:
        if "lifecycle" in parts:
            life = asyncio.run(_lifecycle(factory, trials))
        for name in list(factory.children):
            factory.children[name].stop()
        for count in idle_counts if "writes" in parts else []:
            rates, cpu = _write_load(factory.etcd.endpoint, f"{factory.etcd.client_url}/metrics", count, window,
                                     args.registrant_procs)
            writes[count] = rates
            write_rows.append([str(count), f"{rates['etcd_server_proposals_committed_total']:.1f}",
                               f"{rates['etcd_mvcc_put_total']:.1f}", f"{rates['etcd_mvcc_txn_total']:.1f}",
                               f"{rates['etcd_debugging_lease_renewed_total']:.1f}",
                               f"{rates['etcd_disk_wal_fsync_duration_seconds_count']:.1f}",
                               f"{count / (IDLE_TTL / 3):.1f}", f"{cpu:.2f}"])
            print(f"  measured {count} idle registrants", file=sys.stderr, flush=True)
        if "flood" in parts:
            flood = asyncio.run(_flood(factory, args.flood, window))
    finally:
        factory.close()
        left = factory.leftovers()
        if left:
            print(f"warning: still running after close: {left}", file=sys.stderr)
    decision_rows = _decision_times(args.workers, 200 if args.quick else 1000) if "decisions" in parts else []

    if life:
        print(f"\n1. worker lifecycle, {trials} trials (router policy round-robin over a steady worker and the "
              f"trial's; {int(life['total_requests'][0])} requests sent in all)")
        paid = life["paid"]
        print(table(["interval", "p50 ms", "p99 ms", "max ms"], [
            ["registered (READY seen) -> first routed request", *_ms(life["first"]),
             f"{max(life['first']) * 1e3:.0f}"],
            ["SIGKILL -> gone from a RegistryView (lease TTL 2 s)", *_ms(life["gone"]),
             f"{max(life['gone']) * 1e3:.0f}"],
            ["SIGKILL -> last request that still tried it (router)", *_ms(life["unchosen"]),
             f"{max(life['unchosen']) * 1e3:.0f}"],
        ]))
        print(f"requests per kill that paid a retry or migration: mean {sum(paid) / len(paid):.1f}, "
              f"max {max(paid):.0f}; failed requests after kills: {sum(life['failed']):.0f}")
    if write_rows:
        print(f"\n2. etcd writes per second with idle registrants (each a LeaseSession with its own lease and a "
              f"WorkerRecord, as a worker registers; {args.registrant_procs} processes hold them)")
        print(table(["registrants", "raft proposals/s", "puts/s", "txns/s", "lease renewals/s", "WAL fsyncs/s",
                     "expected keepalives/s", "sessions' CPU s/s"], write_rows))
    if decision_rows:
        print(f"\n3. routing decision time, {args.workers} sim workers in view (in process)")
        print(table(["operation", "request", "p50 ms", "p99 ms"], decision_rows))
    if flood:
        print(f"\n4. registry flood: {args.flood} STARTING worker records written under one lease "
              f"({flood['write_s']:.1f} s), then the lease revoked; requests through the router all along")
        print(table(["router process", "before", "flooded", "after"], [
            ["CPU s/s (idle before and after; traffic while flooded)", f"{flood['cpu_before']:.3f}",
             f"{flood['cpu_flooded']:.3f}", f"{flood['cpu_after']:.3f}"],
            ["RSS MiB", f"{flood['rss_before']:.0f}", f"{flood['rss_flooded']:.0f}", f"{flood['rss_after']:.0f}"],
        ]))
        print(f"RSS after a second flood and revoke: {flood['rss_after_second']:.0f} MiB")
        print(f"first write -> all {args.flood} in the router's view: {flood['seen_s']:.2f} s (WatchLoad streams "
              f"then: {flood['streams_flooded']:.0f}); revoke -> the view back to the 1 real worker: "
              f"{flood['converged_s']:.2f} s; requests while flooded: {flood['served_during']:.0f} served, "
              f"{flood['failed_during']:.0f} failed")

    print()
    for count, rates in writes.items():
        expected = count / (IDLE_TTL / 3)
        print(f"{count} idle registrants: {rates['etcd_debugging_lease_renewed_total'] / expected:.0%} of the "
              f"expected {expected:.0f} keepalives/s; {rates['etcd_mvcc_put_total']:.2f} puts/s and "
              f"{rates['etcd_server_proposals_committed_total']:.2f} raft proposals/s")
    base = {(r[0][-8:], r[1]): float(r[2]) for r in decision_rows if r[0].startswith("choose: round-robin")}
    for row in decision_rows:
        if row[0].startswith("choose: ") and not row[0].startswith("choose: round-robin"):
            print(f"{row[0][8:]} vs round-robin, {row[1]}: {float(row[2]) / base[(row[0][-8:], row[1])]:.1f}x "
                  f"p50 decision time")
    if flood:
        print(f"flood: router memory after / before {flood['rss_after'] / flood['rss_before']:.2f}x; "
              f"idle CPU after / before {flood['cpu_after'] / max(flood['cpu_before'], 1e-3):.1f}x")


if __name__ == "__main__":
    main()
