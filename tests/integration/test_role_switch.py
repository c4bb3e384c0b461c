"""Live role switching on real processes: sim workers, a router, a control plane and etcd.

A decode worker switched to prefill mid-stream and a prefill worker switched
to decode under load: no request fails, every greedy stream equals the run
without a switch, the processes are the same ones (no restart, no reload),
and the router uses the new roles. Then the Admin API's answers, an intent
set before a worker starts, a retargeted switch and a drain during one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys, Kind
from registry.session import LeaseSession
from registry.store import Registry
from registry.view import RegistryView
from tandem.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
# Real-time simulated H100 (about 5 ms a decode step): streams of 400 tokens last seconds, so every stream
# is mid-flight when a switch starts.
# Room for every stream on one decode worker: a request refused by a worker mid-switch avoids it for good, and
# the test is about switching, not about capacity.
SIM = ("--engine", "sim", "--model", MODEL, "--gpu-type", "H100-SXM", "--speedup", "1", "--max-batch-size", "64")
SAMPLING = common_pb2.SamplingParams(max_tokens=400, ignore_eos=True)
PROMPTS = [[10 + i, 20 + i, *range(30, 60)] for i in range(12)]
READY, SWITCHING = registry_pb2.WORKER_STATE_READY, registry_pb2.WORKER_STATE_SWITCHING
PREFILL, DECODE = common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    bed = Testbed(tmp_path_factory.mktemp("role-switch"), shutdown_grace=5)
    try:
        bed.start("cp", "controlplane.server", wait=False)
        bed.start("p0", "prefill_svc", *SIM, "--metrics-listen", "127.0.0.1:0", wait=False)
        # d0's streams outlast its grace: they are handed over, and the router continues them elsewhere.
        bed.start("d0", "decode_svc", *SIM, "--role-switch-grace", "0.5", "--metrics-listen", "127.0.0.1:0",
                  wait=False)
        bed.start("d1", "decode_svc", *SIM, wait=False)
        for child in bed.children.values():
            child.wait_ready(120)
        bed.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8", "--policy", "round-robin",
                  "--suspect-s", "0.5")
        yield bed
    finally:
        assert not bed.close(), "children left running"


@pytest.fixture
async def registry(bed: Testbed) -> AsyncIterator[Registry]:
    async with EtcdClient(EtcdSettings.parse(bed.etcd.endpoint)) as client:
        yield Registry(client, Keys())


@pytest.fixture
async def admin(bed: Testbed) -> AsyncIterator[admin_pb2_grpc.AdminStub]:
    async with grpc.aio.insecure_channel(bed.children["cp"].endpoint) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


@pytest.fixture
async def inference(bed: Testbed) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(bed.children["router"].endpoint) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


async def until(what: str | Callable[[], str], check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    """Polls `check` until true; fails after `timeout` naming `what` (or what `what()` says then)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"never happened: {what() if callable(what) else what}"
        await asyncio.sleep(0.05)


async def record(registry: Registry, worker_id: str) -> registry_pb2.WorkerRecord:
    entry = await registry.get(Kind.WORKER, worker_id)
    assert entry is not None, f"{worker_id} is not registered"
    return entry.record


async def serves(registry: Registry, worker_id: str, role: int) -> bool:
    entry = await registry.get(Kind.WORKER, worker_id)
    return entry is not None and entry.record.role == role and entry.record.state == READY


async def generate(stub: inference_pb2_grpc.InferenceStub, prompt: list[int], seen: list[int] | None = None,
                   ) -> tuple[list[int], inference_pb2.GenerateResponse]:
    tokens: list[int] = []
    last = inference_pb2.GenerateResponse()
    async for response in stub.Generate(inference_pb2.GenerateRequest(
            model=MODEL, prompt_token_ids=prompt, sampling=SAMPLING), timeout=180):
        tokens.extend(response.token_ids)
        if seen is not None:
            seen.append(len(response.token_ids))
        last = response
    return tokens, last


def worker_series(child: ManagedProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one series at the worker's /metrics: sorted label pairs -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{child.info['metrics_port']}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {tuple(sorted(sample.labels.items())): sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


def tandemctl(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "--endpoint", endpoint, *args],
                          capture_output=True, text=True, timeout=60, env=env)


async def routable(stub: inference_pb2_grpc.InferenceStub, prefill: int, decode: int) -> bool:
    models = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
    info = models.get(MODEL)
    return info is not None and (info.prefill_workers, info.decode_workers) == (prefill, decode)


async def test_switches_under_load_lose_and_repeat_no_token(bed: Testbed, registry: Registry,
                                                            admin: admin_pb2_grpc.AdminStub,
                                                            inference: inference_pb2_grpc.InferenceStub) -> None:
    await until("the router sees 1 prefill and 2 decode workers", lambda: routable(inference, 1, 2))
    # The reference: the same greedy requests, concurrently, with no switch.
    expected = [tokens for tokens, _ in await asyncio.gather(*(generate(inference, p) for p in PROMPTS))]
    assert all(len(tokens) == SAMPLING.max_tokens for tokens in expected)
    before = {name: await record(registry, name) for name in ("p0", "d0")}
    pids = {name: bed.children[name].pid for name in ("p0", "d0")}

    # (a) d0 goes to prefill while its streams are mid-flight, through the real CLI.
    progress: list[list[int]] = [[] for _ in PROMPTS]
    first_wave = [asyncio.create_task(generate(inference, p, progress[i])) for i, p in enumerate(PROMPTS)]

    async def all_streaming() -> bool:
        return all(sum(seen) >= 10 for seen in progress)

    await until("every stream of the first wave is under way", all_streaming)
    done = await asyncio.to_thread(tandemctl, bed.children["cp"].endpoint, "role", "set", "d0", "prefill",
                                   "--reason", "more prompts")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "worker d0 switches to prefill (reason: more prompts)"
    await until("d0 serves prefill", lambda: serves(registry, "d0", PREFILL))

    # (b) p0 goes to decode while a second wave of requests arrives, through the Admin API.
    second_wave = [asyncio.create_task(generate(inference, p)) for p in PROMPTS[:6]]
    reply = await admin.SetWorkerRole(admin_pb2.SetWorkerRoleRequest(worker_id="p0", role=DECODE,
                                                                     reason="long outputs"), timeout=10)
    assert reply.intent.role == DECODE and reply.intent.requested_by
    await until("p0 serves decode", lambda: serves(registry, "p0", DECODE))

    results = await asyncio.gather(*first_wave, *second_wave)
    for i, (tokens, last) in enumerate(results):
        assert tokens == expected[i % len(PROMPTS)], f"stream {i} differs from the run without a switch"
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(last.route.migrations for _, last in results) >= 1, "no stream was handed over by d0"

    # The same processes, the model loaded once: only the role and its start time changed.
    for name, role in (("p0", DECODE), ("d0", PREFILL)):
        now = await record(registry, name)
        assert bed.children[name].alive() and bed.children[name].pid == pids[name]
        assert now.started_at_unix_ms == before[name].started_at_unix_ms
        assert now.role == role and now.role_since_unix_ms > before[name].role_since_unix_ms
        assert list(now.switchable_roles) == [PREFILL, DECODE]
    for name, old, new in (("p0", "prefill", "decode"), ("d0", "decode", "prefill")):
        switches = worker_series(bed.children[name], "tandem_worker_role_switches_total")
        assert [(dict(k)["from_role"], dict(k)["role"], v) for k, v in switches.items()] == [(old, new, 1.0)]
        current = {dict(k)["current_role"]: v
                   for k, v in worker_series(bed.children[name], "tandem_worker_current_role").items()}
        assert current == {new: 1.0, old: 0.0}
    workers = {s.record.worker_id: s for s in (await admin.ListWorkers(admin_pb2.ListWorkersRequest())).workers}
    assert workers["d0"].role_intent.role == PREFILL and workers["d0"].role_intent.reason == "more prompts"
    listed = await asyncio.to_thread(tandemctl, bed.children["cp"].endpoint, "workers", "-o", "wide")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines() if line.strip()}
    assert rows["d0"][1] == "prefill" and rows["p0"][1] == "decode", listed.stdout

    # The router routes by the new roles: prefill on d0, decode on p0.
    await until("the router sees d0 as prefill, p0 and d1 as decode", lambda: routable(inference, 1, 2))
    used: set[tuple[str, str]] = set()

    async def new_roles_used() -> bool:
        tokens, last = await generate(inference, PROMPTS[0])
        assert tokens == expected[0]
        used.add((last.route.prefill_worker_id, last.route.decode_worker_id))
        return {prefill for prefill, _ in used} >= {"d0"} and {decode for _, decode in used} >= {"p0"}

    await until(lambda: f"requests prefilled on d0 and decoded on p0 (seen {sorted(used)})", new_roles_used)
    assert all(prefill in ("d0", "") and decode in ("p0", "d1") for prefill, decode in used), used


async def test_admin_api_answers(bed: Testbed, registry: Registry, admin: admin_pb2_grpc.AdminStub) -> None:
    async def status_of(request: admin_pb2.SetWorkerRoleRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.SetWorkerRole(request, timeout=10)
        return info.value.code(), info.value.details() or ""

    assert await status_of(admin_pb2.SetWorkerRoleRequest(worker_id="nobody", role=PREFILL)) == \
        (grpc.StatusCode.NOT_FOUND, "worker 'nobody' is not registered")
    assert await status_of(admin_pb2.SetWorkerRoleRequest(worker_id="d1", role=common_pb2.ROLE_UNIFIED)) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "role must be ROLE_PREFILL or ROLE_DECODE, got ROLE_UNIFIED")
    code, _ = await status_of(admin_pb2.SetWorkerRoleRequest(worker_id="d1", role=PREFILL, reason="x" * 2000))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    # A worker whose record lists no switchable roles (a version or engine that cannot switch live).
    session = LeaseSession(registry.client, ttl=5, name="fixed-0")
    session.start()
    try:
        assert await session.wait_alive(10)
        await registry.register_worker(session, registry_pb2.WorkerRecord(
            worker_id="fixed-0", role=DECODE, model=MODEL, endpoint="127.0.0.1:1", state=READY, engine="sim"))
        code, details = await status_of(admin_pb2.SetWorkerRoleRequest(worker_id="fixed-0", role=PREFILL))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot switch to ROLE_PREFILL without a restart (its switchable roles: none" in details
    finally:
        await session.close()

    # Idempotent: the same role again answers the first intent; clearing twice says whether one was there.
    first = await admin.SetWorkerRole(admin_pb2.SetWorkerRoleRequest(worker_id="d1", role=DECODE), timeout=10)
    again = await admin.SetWorkerRole(admin_pb2.SetWorkerRoleRequest(worker_id="d1", role=DECODE), timeout=10)
    assert again.intent == first.intent
    assert (await admin.ClearWorkerRole(admin_pb2.ClearWorkerRoleRequest(worker_id="d1"), timeout=10)).removed
    assert not (await admin.ClearWorkerRole(admin_pb2.ClearWorkerRoleRequest(worker_id="d1"), timeout=10)).removed
    assert await serves(registry, "d1", DECODE)
    # No planner has planned yet.
    assert list((await admin.GetPlan(admin_pb2.GetPlanRequest(), timeout=10)).plans) == []


async def test_an_intent_set_before_start_is_the_first_ready_role(bed: Testbed, registry: Registry) -> None:
    await registry.set_role("d2", PREFILL, "test", "start as prefill")
    keys = Keys()
    view = RegistryView(registry.client, keys, prefix=keys.kind_prefix(Kind.WORKER), kinds=[Kind.WORKER])
    seen: list[tuple[int, int]] = []

    async def follow() -> None:
        async for change in view.changes():
            if change.name == "d2" and change.new is not None:
                seen.append((change.new.record.state, change.new.record.role))

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)  # subscribed: every version of d2's record from now on
    view.start()
    try:
        assert await view.wait_synced(10)
        child = await asyncio.to_thread(bed.start, "d2", "decode_svc", *SIM)

        async def ready_seen() -> bool:
            return (READY, PREFILL) in seen

        await until("d2 registers READY", ready_seen)
        assert (READY, DECODE) not in seen and all(state != SWITCHING for state, _ in seen), seen
        assert child.alive()
    finally:
        follower.cancel()
        await view.close()
        bed.children["d2"].stop()
        await registry.clear_role("d2")


async def test_a_retarget_ends_the_switch_and_a_drain_wins_over_one(bed: Testbed, registry: Registry) -> None:
    """d1 (decode, 30 s grace) with a long stream: asked for prefill, then decode again, the switch ends and the
    stream runs on; asked for prefill again and drained meanwhile, the drain finishes the stream in full, and
    the worker comes back, undrained, in its new role."""
    d1 = bed.children["d1"]
    pid = d1.pid
    sampling = common_pb2.SamplingParams(max_tokens=1500, ignore_eos=True)

    async def long_stream(first: asyncio.Event) -> list[int]:
        async with grpc.aio.insecure_channel(d1.endpoint) as channel:
            tokens: list[int] = []
            async for step in worker_pb2_grpc.DecodeStub(channel).Decode(worker_pb2.DecodeRequest(
                    model=MODEL, prompt_token_ids=PROMPTS[0], sampling=sampling), timeout=180):
                tokens.extend(step.token_ids)
                first.set()
            return tokens

    async def in_state(state: int, role: int) -> bool:
        entry = await registry.get(Kind.WORKER, "d1")
        return entry is not None and (entry.record.state, entry.record.role) == (state, role)

    first = asyncio.Event()
    stream = asyncio.create_task(long_stream(first))
    await asyncio.wait_for(first.wait(), 60)
    await registry.set_role("d1", PREFILL, "test", "switch")
    await until("d1 switching to prefill", lambda: in_state(SWITCHING, PREFILL))
    await registry.set_role("d1", DECODE, "test", "changed my mind")
    await until("d1 back to decode", lambda: serves(registry, "d1", DECODE))
    assert not stream.done(), "the stream outlives the retargeted switch"

    await registry.set_role("d1", PREFILL, "test", "switch again")
    await until("d1 switching to prefill again", lambda: in_state(SWITCHING, PREFILL))
    await registry.set_drain("d1", "test", "maintenance")
    assert len(await stream) == sampling.max_tokens, "the drain finished the stream in full"

    async def gone() -> bool:
        return await registry.get(Kind.WORKER, "d1") is None

    await until("d1 deregistered", gone)
    await registry.clear_drain("d1")
    await until("d1 back, serving prefill", lambda: serves(registry, "d1", PREFILL))
    assert d1.alive() and d1.pid == pid
    await registry.clear_role("d1")
