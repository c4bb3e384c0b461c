"""A KV handle a decode worker refuses is released by the router at once, not left to its TTL.

Real etcd, a real sim prefill worker, sim decode workers and a router, as
processes. The refusing decode worker keeps its KV in blocks of 32 tokens,
the prefill worker in blocks of 16: the layouts differ, so Decode answers
FAILED_PRECONDITION before moving a byte. The prefill worker's handles live
60 s, so a handle count back at 0 within a few seconds can only be the
router's Release.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pytest

from controlplane.etcd_server import EtcdServer
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import ProcessGroup

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
SIM = ("--engine", "sim", "--model", MODEL, "--gpu-type", "H100-SXM", "--speedup", "1000")
HANDLE_TTL_S = 60
# Far below the TTL: only a release brings the count down this fast.
RELEASED_WITHIN_S = 5.0
T = TypeVar("T")


def start(processes: ProcessGroup, etcd: EtcdServer, name: str, module: str, *args: str) -> str:
    """Starts a service on a free port against `etcd`; returns its endpoint once it serves."""
    worker = ("--worker-id", name, "--node", f"node-{name}") if module != "router_svc" else ()
    return processes.start(name, module, "--etcd", etcd.endpoint, "--listen", "127.0.0.1:0", "--lease-ttl", "2",
                           "--log-format", "text", "--shutdown-grace", "2", *worker, *args).endpoint


async def wait_for(probe: Callable[[], Awaitable[T]], wanted: Callable[[T], bool], timeout: float, what: str) -> T:
    """Polls `probe()` until `wanted` holds for its value; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        last = await probe()
        if wanted(last):
            return last
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s (last: {last!r})"
        await asyncio.sleep(0.05)


async def test_a_refused_handle_is_released_at_once(processes: ProcessGroup, etcd: EtcdServer) -> None:
    prefill = start(processes, etcd, "p0", "prefill_svc", *SIM, "--kv-block-size", "16",
                    "--kv-handle-ttl", str(HANDLE_TTL_S))
    start(processes, etcd, "d-other-layout", "decode_svc", *SIM, "--kv-block-size", "32")
    router = start(processes, etcd, "router", "router_svc", "--local-prefill-max-prompt-tokens", "1",
                   "--capacity-wait-s", "0.5", "--policy", "round-robin")
    request = inference_pb2.GenerateRequest(model=MODEL, prompt_token_ids=list(range(10, 60)),
                                            sampling=common_pb2.SamplingParams(max_tokens=8, ignore_eos=True))
    async with grpc.aio.insecure_channel(router) as router_channel, \
            grpc.aio.insecure_channel(prefill) as prefill_channel:
        inference = inference_pb2_grpc.InferenceStub(router_channel)
        p0 = worker_pb2_grpc.WorkerStub(prefill_channel)

        async def open_handles() -> int:
            return (await p0.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)).open_kv_handles

        async def routable() -> tuple[int, int]:
            models = (await inference.ListModels(inference_pb2.ListModelsRequest(), timeout=5)).models
            return next(((m.prefill_workers, m.decode_workers) for m in models if m.name == MODEL), (0, 0))

        # 1. The only decode worker refuses the handle: the request fails (nowhere left to prefill locally),
        #    and the prefill worker holds nothing once the answer is in.
        await wait_for(routable, lambda seen: seen == (1, 1), 30, "the router sees p0 and the refusing decode worker")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await inference.Complete(request, timeout=30)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value.details()
        await wait_for(open_handles, lambda n: n == 0, RELEASED_WITHIN_S, "open KV handles on p0 back to 0")

        # 2. With a decode worker of the right layout the refused requests complete there, by a local prefill;
        #    the others take the handle over. Either way nothing is left on the prefill worker.
        start(processes, etcd, "d-same-layout", "decode_svc", *SIM, "--kv-block-size", "16")
        await wait_for(routable, lambda seen: seen == (1, 2), 30, "the router sees both decode workers")
        replies = [await inference.Complete(request, timeout=30) for _ in range(4)]
        assert all(len(r.token_ids) == 8 for r in replies)
        assert {r.route.decode_worker_id for r in replies} == {"d-same-layout"}
        refused = [r for r in replies if r.route.retries]
        assert refused, "round-robin never offered the refusing decode worker a handle: the test proved nothing"
        assert all(r.route.local_prefill and r.route.retries == 1 for r in refused)
        await wait_for(open_handles, lambda n: n == 0, RELEASED_WITHIN_S, "open KV handles on p0 back to 0")
