"""The router against real etcd and real worker processes: equality, failures, drain, bad input."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.supervisor import ManagedProcess, health_status
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys
from registry.store import Registry
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

SIM = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM")


Factory = Testbed


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[Factory]:
    f = Factory(tmp_path)
    yield f
    assert not f.close(), "children left running"


@pytest.fixture
async def etcd_registry(factory: Factory) -> AsyncIterator[Registry]:
    async with EtcdClient(EtcdSettings.parse(factory.etcd.endpoint)) as client:
        yield Registry(client, Keys())


def inference(router: ManagedProcess) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceStub]:
    channel = grpc.aio.insecure_channel(router.endpoint)
    return channel, inference_pb2_grpc.InferenceStub(channel)


async def wait_models(stub: inference_pb2_grpc.InferenceStub, model: str, prefill: int, decode: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
        info = listed.get(model)
        if info is not None and info.prefill_workers == prefill and info.decode_workers == decode:
            return
        assert time.monotonic() < deadline, f"router never saw {prefill}P+{decode}D for {model}: {listed}"
        await asyncio.sleep(0.05)


async def unified_tokens(decode: ManagedProcess, model: str, prompt: list[int],
                         sampling: common_pb2.SamplingParams) -> list[int]:
    async with grpc.aio.insecure_channel(decode.endpoint) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)
        return [t async for step in stub.Decode(worker_pb2.DecodeRequest(
            model=model, prompt_token_ids=prompt, sampling=sampling)) for t in step.token_ids]


async def stream(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest,
                 ) -> tuple[list[int], list[inference_pb2.GenerateResponse]]:
    responses = [r async for r in stub.Generate(request, timeout=120)]
    return [t for r in responses for t in r.token_ids], responses


async def test_router_output_equals_unified_generation_torch(factory: Factory) -> None:
    torch_args = ("--engine", "torch", "--model", "tiny")
    factory.start("p0", "prefill_svc", *torch_args)
    d0 = factory.start("d0", "decode_svc", *torch_args)
    router = factory.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "4")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "tiny", 1, 1)
        from engine.hf_tokenizer import load_tokenizer
        from engine.tiny_model import ensure_tiny_checkpoint

        tokenizer = load_tokenizer(ensure_tiny_checkpoint())
        for text in ["héllo wörld 你好 🚀 and more", "short", "a longer prompt " * 20]:
            for sampling in (common_pb2.SamplingParams(max_tokens=16, ignore_eos=True),
                             common_pb2.SamplingParams(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True)):
                tokens, responses = await stream(stub, inference_pb2.GenerateRequest(
                    model="tiny", prompt=text, sampling=sampling))
                expected = await unified_tokens(d0, "tiny", tokenizer.encode(text), sampling)
                assert tokens == expected
                last = responses[-1]
                assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
                assert last.usage.completion_tokens == 16 and last.usage.prompt_tokens == len(tokenizer.encode(text))
                assert "".join(r.text for r in responses) == tokenizer.decode(expected)
                assert last.timings.ttft_ms > 0 and last.timings.e2e_ms >= last.timings.ttft_ms
                local = len(tokenizer.encode(text)) <= 4
                assert last.route.local_prefill is local
                assert last.route.decode_worker_id == "d0"
                assert last.route.prefill_worker_id == ("" if local else "p0")
        complete = await stub.Complete(inference_pb2.GenerateRequest(
            model="tiny", prompt="complete me", sampling=common_pb2.SamplingParams(max_tokens=5, ignore_eos=True)))
        assert len(complete.token_ids) == 5 and complete.text == tokenizer.decode(list(complete.token_ids))


async def test_bad_input_gets_the_right_status_and_the_router_stays_healthy(factory: Factory) -> None:
    factory.start("d0", "decode_svc", *SIM, "--speedup", "1000")
    router = factory.start("router", "router_svc", "--max-output-tokens", "512")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "llama-3-8b", 0, 1)
        sampling = common_pb2.SamplingParams
        cases = [
            (inference_pb2.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "unknown model"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt=""), grpc.StatusCode.INVALID_ARGUMENT,
             "prompt is empty"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt="x", sampling=sampling(max_tokens=0)),
             grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be 1..512, got 0"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt="x", sampling=sampling(max_tokens=513)),
             grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be 1..512, got 513"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt="x", sampling=sampling(temperature=-0.5)),
             grpc.StatusCode.INVALID_ARGUMENT, "temperature must be 0..100"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt="x", sampling=sampling(top_p=0)),
             grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt="x", sampling=sampling(top_p=1.5)),
             grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt="y" * 9000), grpc.StatusCode.INVALID_ARGUMENT,
             "takes at most 8192 tokens"),
            (inference_pb2.GenerateRequest(model="llama-3-8b", prompt="x", prompt_token_ids=[5]),
             grpc.StatusCode.INVALID_ARGUMENT, "exactly one of prompt, prompt_token_ids and messages"),
        ]
        for request, code, fragment in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Complete(request, timeout=10)
            assert info.value.code() == code, (request, info.value.details())
            assert fragment in (info.value.details() or ""), info.value.details()
        assert health_status(router.endpoint) == "SERVING"
        ok = await stub.Complete(inference_pb2.GenerateRequest(model="llama-3-8b", prompt="still fine",
                                                               sampling=sampling(max_tokens=3)))
        assert len(ok.token_ids) == 3


async def test_no_prefill_worker_means_local_prefill(factory: Factory) -> None:
    factory.start("d0", "decode_svc", *SIM, "--speedup", "1000")
    router = factory.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "1")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "llama-3-8b", 0, 1)
        reply = await stub.Complete(inference_pb2.GenerateRequest(
            model="llama-3-8b", prompt="a prompt long enough to disaggregate",
            sampling=common_pb2.SamplingParams(max_tokens=8)))
        assert len(reply.token_ids) == 8
        assert reply.route.local_prefill and reply.route.reason == "no-prefill-worker"


@pytest.mark.fault
async def test_sigkill_decode_mid_stream_loses_and_repeats_nothing(factory: Factory) -> None:
    # Real-time simulated H100 (a few ms per step): every stream is mid-flight when the worker dies.
    sim = (*SIM, "--speedup", "1")
    factory.start("p0", "prefill_svc", *sim)
    d0 = factory.start("d0", "decode_svc", *sim)
    d1 = factory.start("d1", "decode_svc", *sim)
    router = factory.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8", "--policy",
                           "round-robin")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "llama-3-8b", 1, 2)
        sampling = common_pb2.SamplingParams(max_tokens=300, ignore_eos=True)
        prompts = [[10 + i, 20 + i, *range(30, 60)] for i in range(16)]
        expected = await asyncio.gather(*(unified_tokens(d1, "llama-3-8b", p, sampling) for p in prompts))
        started = asyncio.Event()
        seen = [0] * 16

        async def one(i: int) -> tuple[list[int], inference_pb2.GenerateResponse]:
            tokens: list[int] = []
            last = inference_pb2.GenerateResponse()
            async for response in stub.Generate(inference_pb2.GenerateRequest(
                    model="llama-3-8b", prompt_token_ids=prompts[i], sampling=sampling), timeout=120):
                tokens.extend(response.token_ids)
                seen[i] = len(tokens)
                if all(n >= 10 for n in seen):
                    started.set()
                last = response
            return tokens, last

        tasks = [asyncio.create_task(one(i)) for i in range(16)]
        await asyncio.wait_for(started.wait(), 60)
        victim = d0
        victim.kill()
        results = await asyncio.gather(*tasks)
        migrated = 0
        for i, (tokens, last) in enumerate(results):
            assert tokens == expected[i], f"stream {i} differs after the kill"
            assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            migrated += last.route.migrations
        assert migrated >= 1, "no stream was on the killed worker"


@pytest.mark.fault
async def test_sigkill_prefill_under_load_fails_no_request(factory: Factory) -> None:
    sim = (*SIM, "--speedup", "50")
    p0 = factory.start("p0", "prefill_svc", *sim)
    factory.start("p1", "prefill_svc", *sim)
    factory.start("d0", "decode_svc", *sim, "--max-batch-size", "64")
    router = factory.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "llama-3-8b", 2, 1)
        sampling = common_pb2.SamplingParams(max_tokens=20, ignore_eos=True)

        async def one(i: int) -> int:
            reply = await stub.Complete(inference_pb2.GenerateRequest(
                model="llama-3-8b", prompt_token_ids=list(range(5 + i % 7, 200)), sampling=sampling), timeout=60)
            return len(reply.token_ids)

        tasks = [asyncio.create_task(one(i)) for i in range(40)]
        await asyncio.sleep(0)  # let the first wave reach the workers
        p0.kill()
        results = await asyncio.gather(*tasks)
        assert results == [20] * 40


async def test_drained_worker_gets_no_new_requests_and_finishes_in_flight(factory: Factory,
                                                                          etcd_registry: Registry) -> None:
    sim = (*SIM, "--speedup", "50")
    factory.start("d0", "decode_svc", *sim)
    factory.start("d1", "decode_svc", *sim)
    router = factory.start("router", "router_svc", "--policy", "round-robin")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "llama-3-8b", 0, 2)
        long = common_pb2.SamplingParams(max_tokens=150, ignore_eos=True)
        in_flight = stub.Generate(inference_pb2.GenerateRequest(model="llama-3-8b", prompt="keep going",
                                                                 sampling=long), timeout=60)
        first = await in_flight.read()
        assert first.token_ids
        await etcd_registry.set_drain("d0", "test", "maintenance")
        await wait_models(stub, "llama-3-8b", 0, 1)
        short = common_pb2.SamplingParams(max_tokens=4)
        routes = set()
        for _ in range(6):
            reply = await stub.Complete(inference_pb2.GenerateRequest(model="llama-3-8b", prompt="x", sampling=short))
            routes.add(reply.route.decode_worker_id)
        assert routes == {"d1"}
        rest = []
        while (response := await in_flight.read()) is not grpc.aio.EOF:
            rest.append(response)
        total = len(first.token_ids) + sum(len(r.token_ids) for r in rest)
        assert total == 150 and rest[-1].route.migrations == 0


async def test_cordoned_node_gets_no_new_requests(factory: Factory, etcd_registry: Registry) -> None:
    sim = (*SIM, "--speedup", "1000")
    factory.start("d0", "decode_svc", *sim)
    factory.start("d1", "decode_svc", *sim)
    router = factory.start("router", "router_svc", "--policy", "round-robin")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "llama-3-8b", 0, 2)
        await etcd_registry.set_cordon("node-d1", "test", "bad fan")
        await wait_models(stub, "llama-3-8b", 0, 1)
        routes = {(await stub.Complete(inference_pb2.GenerateRequest(
            model="llama-3-8b", prompt="x", sampling=common_pb2.SamplingParams(max_tokens=2)))).route.decode_worker_id
            for _ in range(6)}
        assert routes == {"d0"}
        await etcd_registry.clear_cordon("node-d1")
        await wait_models(stub, "llama-3-8b", 0, 2)


async def test_client_cancel_frees_the_worker_sequence(factory: Factory) -> None:
    d0 = factory.start("d0", "decode_svc", *SIM, "--speedup", "5")
    router = factory.start("router", "router_svc")
    channel, stub = inference(router)
    async with channel, grpc.aio.insecure_channel(d0.endpoint) as worker_channel:
        await wait_models(stub, "llama-3-8b", 0, 1)
        worker = worker_pb2_grpc.WorkerStub(worker_channel)
        call = stub.Generate(inference_pb2.GenerateRequest(
            model="llama-3-8b", prompt="cancel me", sampling=common_pb2.SamplingParams(max_tokens=2000,
                                                                                       ignore_eos=True)))
        assert (await call.read()).token_ids
        load = await worker.GetLoad(worker_pb2.GetLoadRequest())
        assert load.active_sequences == 1
        call.cancel()
        deadline = time.monotonic() + 10
        while True:
            load = await worker.GetLoad(worker_pb2.GetLoadRequest())
            if load.active_sequences == 0 and load.active_requests == 0:
                break
            assert time.monotonic() < deadline, f"sequence not freed after cancel: {load}"
            await asyncio.sleep(0.05)


@pytest.mark.fault
async def test_stalled_decode_worker_is_migrated_away_from(factory: Factory) -> None:
    """A decode worker that stops answering (SIGSTOP: its sockets stay open, nothing errors) holds no stream:
    after --stall-timeout-s the router moves the sequence to another worker, with no lost or repeated token."""
    sim = (*SIM, "--speedup", "2")
    d0 = factory.start("d0", "decode_svc", *sim)
    d1 = factory.start("d1", "decode_svc", *sim)
    router = factory.start("router", "router_svc", "--stall-timeout-s", "1", "--policy", "round-robin")
    channel, stub = inference(router)
    async with channel:
        await wait_models(stub, "llama-3-8b", 0, 2)
        sampling = common_pb2.SamplingParams(max_tokens=60, ignore_eos=True)
        prompt = list(range(40, 70))
        expected = await unified_tokens(d1, "llama-3-8b", prompt, sampling)
        call = stub.Generate(inference_pb2.GenerateRequest(model="llama-3-8b", prompt_token_ids=prompt,
                                                           sampling=sampling), timeout=60)
        first = await call.read()
        tokens = list(first.token_ids)
        # Whoever serves it, freeze that worker mid-stream.
        frozen = d0
        last = first
        async with grpc.aio.insecure_channel(d0.endpoint) as d0_channel:
            load = await worker_pb2_grpc.WorkerStub(d0_channel).GetLoad(worker_pb2.GetLoadRequest())
        if load.active_sequences == 0:
            frozen = d1
        frozen.send(signal.SIGSTOP)
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                tokens.extend(response.token_ids)
                last = response
        finally:
            frozen.send(signal.SIGCONT)
        assert tokens == expected
        assert last.route.migrations >= 1


async def test_router_replicas_share_nothing_but_etcd_and_workers(factory: Factory) -> None:
    """Two routers side by side serve the same workers; losing one leaves the other serving."""
    sim = (*SIM, "--speedup", "1000")
    factory.start("p0", "prefill_svc", *sim)
    factory.start("d0", "decode_svc", *sim)
    first = factory.start("router-a", "router_svc", "--local-prefill-max-prompt-tokens", "4")
    second = factory.start("router-b", "router_svc", "--local-prefill-max-prompt-tokens", "4")
    request = inference_pb2.GenerateRequest(model="llama-3-8b", prompt="the same prompt, either router",
                                            sampling=common_pb2.SamplingParams(max_tokens=12, ignore_eos=True))
    answers = []
    for router in (first, second):
        channel, stub = inference(router)
        async with channel:
            await wait_models(stub, "llama-3-8b", 1, 1)
            answers.append(await stub.Complete(request, timeout=30))
    assert answers[0].token_ids == answers[1].token_ids and len(answers[0].token_ids) == 12
    assert {a.route.prefill_worker_id for a in answers} == {"p0"}
    first.kill()
    channel, stub = inference(second)
    async with channel:
        again = await stub.Complete(request, timeout=30)
    assert again.token_ids == answers[0].token_ids
