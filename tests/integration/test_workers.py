"""Prefill and decode workers as real processes: disaggregated output, errors, cancellation, drain."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys, Kind
from registry.store import Registry
from tandem.v1 import common_pb2, registry_pb2, worker_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    fleet = Testbed(tmp_path_factory.mktemp("workers"), shutdown_grace=5)
    torch_args = ("--engine", "torch", "--model", "tiny")
    sim_args = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM", "--speedup", "1000")
    fleet.start("torch-p", "prefill_svc", *torch_args, "--kv-transports", "grpc,shm,tcp", wait=False)
    # Decode workers accept only the transports they list: tcp must be named to be pulled.
    fleet.start("torch-d", "decode_svc", *torch_args, "--kv-transports", "grpc,shm,tcp", wait=False)
    fleet.start("sim-p", "prefill_svc", *sim_args, "--kv-handle-ttl", "1", wait=False)
    fleet.start("sim-d", "decode_svc", *sim_args, wait=False)
    try:
        for child in fleet.children.values():
            child.wait_ready(120)
        yield fleet
    finally:
        assert not fleet.close(), "children left running"


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from engine.hf_tokenizer import load_tokenizer
    from engine.tiny_model import ensure_tiny_checkpoint

    return load_tokenizer(ensure_tiny_checkpoint())


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.prefill = worker_pb2_grpc.PrefillStub(channel)
        self.decode = worker_pb2_grpc.DecodeStub(channel)
        self.worker = worker_pb2_grpc.WorkerStub(channel)
        self.kv = worker_pb2_grpc.KvSourceStub(channel)


@pytest.fixture
async def stubs(fleet: Testbed) -> AsyncIterator[dict[str, Stubs]]:
    channels = {name: grpc.aio.insecure_channel(child.endpoint) for name, child in fleet.children.items()}
    yield {name: Stubs(channel) for name, channel in channels.items()}
    for channel in channels.values():
        await channel.close()


async def disaggregated(p: Stubs, d: Stubs, prompt: list[int], sampling: common_pb2.SamplingParams,
                        transports: list[str], model: str) -> tuple[list[int], str]:
    reply = await p.prefill.Prefill(worker_pb2.PrefillRequest(
        model=model, prompt_token_ids=prompt, sampling=sampling, kv_transports=transports,
        consumer_host=socket.gethostname()), timeout=60)
    tokens = [reply.first_token_id]
    if not reply.HasField("handle"):
        return tokens, ""
    async for step in d.decode.Decode(worker_pb2.DecodeRequest(
            model=model, prompt_token_ids=prompt, sampling=sampling, handle=reply.handle,
            first_token_id=reply.first_token_id), timeout=60):
        tokens.extend(step.token_ids)
    return tokens, reply.handle.transport


async def unified(d: Stubs, prompt: list[int], sampling: common_pb2.SamplingParams, model: str,
                  generated: list[int] | None = None) -> list[int]:
    tokens: list[int] = []
    async for step in d.decode.Decode(worker_pb2.DecodeRequest(
            model=model, prompt_token_ids=prompt, sampling=sampling, generated_token_ids=generated or []),
            timeout=60):
        tokens.extend(step.token_ids)
    return tokens


PROMPTS = ["a", "héllo wörld 你好 🚀", "the quick brown fox " * 60, "ab" * 7, "Tandem pairs prefill and decode."]


@pytest.mark.parametrize("transport", ["grpc", "shm", "tcp"])
async def test_torch_disaggregated_equals_unified(stubs, tokenizer, transport: str) -> None:  # type: ignore[no-untyped-def]
    p, d = stubs["torch-p"], stubs["torch-d"]
    samplings = [common_pb2.SamplingParams(max_tokens=12, ignore_eos=True),
                 common_pb2.SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7,
                                           ignore_eos=True)]
    for text in PROMPTS:
        prompt = tokenizer.encode(text)
        for sampling in samplings:
            split, used = await disaggregated(p, d, prompt, sampling, [transport], "tiny")
            assert used == transport
            whole = await unified(d, prompt, sampling, "tiny")
            assert split == whole, f"{text[:20]!r} {sampling}"
            assert len(whole) == 12


async def test_migration_continues_exactly(stubs, tokenizer) -> None:  # type: ignore[no-untyped-def]
    d = stubs["torch-d"]
    prompt = tokenizer.encode("resume me exactly")
    for sampling in (common_pb2.SamplingParams(max_tokens=10, ignore_eos=True),
                     common_pb2.SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)):
        whole = await unified(d, prompt, sampling, "tiny")
        rest = await unified(d, prompt, sampling, "tiny", generated=whole[:4])
        assert whole[:4] + rest == whole


async def test_sim_disaggregated_equals_unified(stubs) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(10, 250))
    sampling = common_pb2.SamplingParams(max_tokens=16, ignore_eos=True)
    split, _ = await disaggregated(stubs["sim-p"], stubs["sim-d"], prompt, sampling, ["grpc"], "llama-3-8b")
    assert split == await unified(stubs["sim-d"], prompt, sampling, "llama-3-8b")


async def expect_status(call, code: grpc.StatusCode, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in (info.value.details() or ""), info.value.details()


async def test_bad_requests_get_clear_statuses_and_the_worker_stays_healthy(stubs, fleet) -> None:  # type: ignore[no-untyped-def]
    p, d = stubs["torch-p"], stubs["torch-d"]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    ok = common_pb2.SamplingParams(max_tokens=4)
    cases = [
        (worker_pb2.PrefillRequest(model="tiny", sampling=ok), "prompt is empty"),
        (worker_pb2.PrefillRequest(model="tiny", prompt_token_ids=[1], sampling=common_pb2.SamplingParams(
            max_tokens=0)), "max_tokens must be 1.."),
        (worker_pb2.PrefillRequest(model="tiny", prompt_token_ids=[1], sampling=common_pb2.SamplingParams(
            temperature=-1)), "temperature must be 0..100"),
        (worker_pb2.PrefillRequest(model="tiny", prompt_token_ids=[1], sampling=common_pb2.SamplingParams(
            temperature=float("inf"))), "temperature must be 0..100, got inf"),
        (worker_pb2.PrefillRequest(model="tiny", prompt_token_ids=[1], sampling=common_pb2.SamplingParams(
            top_k=2**32 - 1)), "top_k must be 0..1048576"),
        (worker_pb2.PrefillRequest(model="tiny", prompt_token_ids=[1], sampling=common_pb2.SamplingParams(
            top_p=1.5)), "top_p must be in (0, 1]"),
        (worker_pb2.PrefillRequest(model="tiny", prompt_token_ids=[10**6], sampling=ok), "[0] is 1000000"),
        (worker_pb2.PrefillRequest(model="other", prompt_token_ids=[1], sampling=ok), "serves model 'tiny'"),
    ]
    for request, message in cases:
        await expect_status(lambda r=request: p.prefill.Prefill(r, timeout=10), invalid, message)
    await expect_status(lambda: d.decode.Decode(worker_pb2.DecodeRequest(
        model="tiny", prompt_token_ids=[1, 2], sampling=ok, handle=common_pb2.KvHandle(handle_id="x", num_tokens=2)),
        timeout=10), invalid, "first_token_id is required")
    from controlplane.supervisor import health_status

    assert health_status(fleet.children["torch-p"].endpoint) == "SERVING"
    assert health_status(fleet.children["torch-d"].endpoint) == "SERVING"


async def test_kv_of_another_layout_is_refused_and_unknown_handles_are_not_found(stubs, tokenizer) -> None:  # type: ignore[no-untyped-def]
    p, d = stubs["torch-p"], stubs["torch-d"]
    prompt = tokenizer.encode("mismatch")
    sampling = common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)
    reply = await p.prefill.Prefill(worker_pb2.PrefillRequest(model="tiny", prompt_token_ids=prompt,
                                                              sampling=sampling), timeout=30)
    foreign = common_pb2.KvHandle()
    foreign.CopyFrom(reply.handle)
    foreign.layout.model_fingerprint = "another-model"
    await expect_status(lambda: d.decode.Decode(worker_pb2.DecodeRequest(
        model="tiny", prompt_token_ids=prompt, sampling=sampling, handle=foreign,
        first_token_id=reply.first_token_id), timeout=30),
        grpc.StatusCode.FAILED_PRECONDITION, "model_fingerprint")
    unknown = common_pb2.KvHandle()
    unknown.CopyFrom(reply.handle)
    unknown.handle_id = "no-such-handle"
    await expect_status(lambda: d.decode.Decode(worker_pb2.DecodeRequest(
        model="tiny", prompt_token_ids=prompt, sampling=sampling, handle=unknown,
        first_token_id=reply.first_token_id), timeout=30), grpc.StatusCode.NOT_FOUND, "no-such-handle")
    await p.kv.Release(worker_pb2.KvReleaseRequest(handle_id=reply.handle.handle_id))


async def poll_load(stub: Stubs, predicate, timeout: float = 15) -> worker_pb2.LoadReport:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        load = await stub.worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        if predicate(load):
            return load
        assert time.monotonic() < deadline, f"load never matched: {load}"
        await asyncio.sleep(0.05)


async def test_unreleased_handles_expire(stubs) -> None:  # type: ignore[no-untyped-def]
    p, d = stubs["sim-p"], stubs["sim-d"]
    prompt = list(range(5, 50))
    sampling = common_pb2.SamplingParams(max_tokens=4)
    reply = await p.prefill.Prefill(worker_pb2.PrefillRequest(model="llama-3-8b", prompt_token_ids=prompt,
                                                              sampling=sampling), timeout=10)
    assert (await p.worker.GetLoad(worker_pb2.GetLoadRequest())).open_kv_handles >= 1
    # Nobody pulls it (a decode worker that died before its pull): the 1 s TTL frees it.
    await poll_load(p, lambda load: load.open_kv_handles == 0)
    await expect_status(lambda: d.decode.Decode(worker_pb2.DecodeRequest(
        model="llama-3-8b", prompt_token_ids=prompt, sampling=sampling, handle=reply.handle,
        first_token_id=reply.first_token_id), timeout=10), grpc.StatusCode.NOT_FOUND)


async def test_cancelled_decode_frees_its_sequence(stubs) -> None:  # type: ignore[no-untyped-def]
    d = stubs["torch-d"]
    call = d.decode.Decode(worker_pb2.DecodeRequest(
        model="tiny", prompt_token_ids=list(range(3, 40)),
        sampling=common_pb2.SamplingParams(max_tokens=2000, ignore_eos=True)), timeout=60)
    async for _ in call:
        break  # the first tokens arrived: the sequence is live on the worker
    assert (await d.worker.GetLoad(worker_pb2.GetLoadRequest())).active_sequences >= 1
    call.cancel()
    await poll_load(d, lambda load: load.active_sequences == 0 and load.active_requests == 0)


async def test_watch_load_streams_changes(stubs) -> None:  # type: ignore[no-untyped-def]
    d = stubs["sim-d"]
    reports = d.worker.WatchLoad(worker_pb2.WatchLoadRequest(min_interval_ms=10, max_interval_ms=200))
    first = await reports.read()
    assert first.worker_id == "sim-d" and first.role == common_pb2.ROLE_DECODE and first.kv_blocks_total > 0
    second = await reports.read()
    assert second.sequence > first.sequence
    reports.cancel()


async def test_drain_intent_finishes_in_flight_then_deregisters(fleet, stubs) -> None:  # type: ignore[no-untyped-def]
    d = stubs["sim-d"]
    async with EtcdClient(EtcdSettings.parse(fleet.etcd.endpoint)) as client:
        registry = Registry(client, Keys())
        slow = d.decode.Decode(worker_pb2.DecodeRequest(
            model="llama-3-8b", prompt_token_ids=list(range(5, 30)),
            sampling=common_pb2.SamplingParams(max_tokens=400, ignore_eos=True)), timeout=60)
        async for _ in slow:
            break
        await registry.set_drain("sim-d", "test", "maintenance")
        # New work is refused at once...
        deadline = time.monotonic() + 10
        while True:
            try:
                await unified(d, [5, 6, 7], common_pb2.SamplingParams(max_tokens=2), "llama-3-8b")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and "draining" in (exc.details() or "")
                break
            assert time.monotonic() < deadline, "drain intent never reached the worker"
            await asyncio.sleep(0.05)
        # ...the accepted stream finishes in full...
        rest = [t async for step in slow for t in step.token_ids]
        assert len(rest) == 399
        # ...then the worker leaves the registry.
        deadline = time.monotonic() + 10
        while await registry.get(Kind.WORKER, "sim-d") is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await registry.clear_drain("sim-d")
        deadline = time.monotonic() + 10
        while True:
            entry = await registry.get(Kind.WORKER, "sim-d")
            if entry is not None and entry.record.state == registry_pb2.WORKER_STATE_READY:
                break
            assert time.monotonic() < deadline, "undrained worker did not come back"
            await asyncio.sleep(0.05)
        assert await unified(d, [5, 6, 7], common_pb2.SamplingParams(max_tokens=2), "llama-3-8b")


@pytest.mark.fault
async def test_decode_worker_killed_mid_pull_leaves_no_handle_after_the_ttl(tmp_path: Path) -> None:
    """The decode worker dies while pulling a large KV cache: it never releases the handle, so the
    prefill worker frees it when the TTL passes, and stays healthy."""
    bed = Testbed(tmp_path, shutdown_grace=5)
    try:
        # Real KV bytes of the simulated size: 2000 tokens of Llama-3-8B is 256 MiB, long enough to kill mid-way.
        sim = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM", "--speedup", "1000",
               "--sim-kv-bytes", "real")
        prefill = bed.start("p", "prefill_svc", *sim, "--kv-handle-ttl", "3", "--kv-transports", "grpc")
        decode = bed.start("d", "decode_svc", *sim)
        prompt = [5 + i % 200 for i in range(2000)]
        sampling = common_pb2.SamplingParams(max_tokens=4)
        async with grpc.aio.insecure_channel(prefill.endpoint) as pc, grpc.aio.insecure_channel(decode.endpoint) as dc:
            p = Stubs(pc)
            reply = await p.prefill.Prefill(worker_pb2.PrefillRequest(
                model="llama-3-8b", prompt_token_ids=prompt, sampling=sampling, kv_transports=["grpc"]), timeout=60)
            assert reply.handle.nbytes >= 200 << 20
            call = Stubs(dc).decode.Decode(worker_pb2.DecodeRequest(
                model="llama-3-8b", prompt_token_ids=prompt, sampling=sampling, handle=reply.handle,
                first_token_id=reply.first_token_id), timeout=60)
            # Kill the decode worker as soon as the producer is streaming the payload to it.
            await poll_load(p, lambda load: load.open_kv_handles == 1)
            decode.kill()
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in call:
                    pass
            assert (await p.worker.GetLoad(worker_pb2.GetLoadRequest())).open_kv_handles == 1
            await poll_load(p, lambda load: load.open_kv_handles == 0, timeout=15)
        from controlplane.supervisor import health_status

        assert health_status(prefill.endpoint) == "SERVING"
    finally:
        assert not bed.close(), "children left running"
