"""Fixtures shared by the fault drills: a fleet of real processes on a real etcd (1 or 3 members).

`fleet` gives a `Fleet` on a single-member etcd, `fleet3` one on a static
3-member cluster; every process is started with every etcd endpoint
(`--etcd a,b,c`), the short lease TTL of the drills, and its own log file
under the test's tmp dir. Teardown stops every child by PID (SIGCONT first,
so a paused one can take its SIGTERM) and fails the test if one is left.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdUnavailable
from registry.keys import Keys, Kind
from registry.store import Registry
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed

# Short enough that lease expiry fits in a fast drill, long enough for a 2-core machine under load.
TTL = 2
MODEL = "llama-3-8b"
SIM = ("--engine", "sim", "--model", MODEL, "--gpu-type", "H100-SXM")


Fleet = Testbed


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, lease_ttl=TTL)
    yield f
    assert not f.close(), "children left running"


@pytest.fixture
def fleet3(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, members=3, lease_ttl=TTL)
    yield f
    assert not f.close(), "children left running"


async def wait_until(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls `probe()` (sync or async) until truthy; returns its value, or fails naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
            if inspect.isawaitable(last):
                last = await last
        except (grpc.aio.AioRpcError, EtcdUnavailable, ConnectionError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
        await asyncio.sleep(0.05)


async def wait_models(endpoint: str, prefill: int, decode: int, model: str = MODEL, timeout: float = 20) -> None:
    """Waits until the router at `endpoint` routes to exactly `prefill` + `decode` workers of `model`."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def routable() -> bool:
            listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)).models}
            info = listed.get(model)
            return info is not None and (info.prefill_workers, info.decode_workers) == (prefill, decode)

        await wait_until(routable, timeout, f"router sees {prefill}P+{decode}D of {model}")


async def unified_tokens(decode_endpoint: str, prompt: list[int], sampling: common_pb2.SamplingParams,
                         model: str = MODEL) -> list[int]:
    """The whole generation of `prompt` on one decode worker (local prefill, no router): the reference."""
    async with grpc.aio.insecure_channel(decode_endpoint) as channel:
        stub = worker_pb2_grpc.DecodeStub(channel)
        return [t async for step in stub.Decode(worker_pb2.DecodeRequest(
            model=model, prompt_token_ids=prompt, sampling=sampling), timeout=120) for t in step.token_ids]


async def expected_generations(decode_endpoint: str, prompts: list[list[int]],
                               sampling: common_pb2.SamplingParams) -> dict[tuple[int, ...], list[int]]:
    """prompt -> reference generation, for each distinct prompt (a few at a time, not to flood one worker)."""
    distinct = sorted({tuple(p) for p in prompts})
    gate = asyncio.Semaphore(8)

    async def one(prompt: tuple[int, ...]) -> list[int]:
        async with gate:
            return await unified_tokens(decode_endpoint, list(prompt), sampling)

    generations = await asyncio.gather(*(one(p) for p in distinct))
    return dict(zip(distinct, generations, strict=True))


async def get_load(endpoint: str) -> worker_pb2.LoadReport:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)


async def registered_workers(fleet: Fleet) -> set[str]:
    """Worker ids with a record in etcd now (raises EtcdUnavailable while etcd is away)."""
    async with fleet.client() as client:
        _, entries = await Registry(client, Keys()).list(Kind.WORKER)
    return {entry.name for entry in entries}


def pids(children: dict[str, ManagedProcess]) -> dict[str, int]:
    return {name: child.pid for name, child in children.items()}


def exited(children: dict[str, ManagedProcess]) -> list[str]:
    """Names of children that have exited (empty when every one is still running)."""
    return [name for name, child in children.items() if not child.alive()]
