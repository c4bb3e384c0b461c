"""Workers publish their model's shape; the router prices each model by it (real etcd, sim workers, router)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine.sim.profiles import get_profile
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import Keys, Kind
from registry.store import Registry
from router_svc.candidates_pb import candidate_from_pb
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

SMALL, LARGE = "llama-3-8b", "llama-3-70b"
# Per model: a decode worker, a prefill worker beside it on slower GPUs (H200 NVL)
# and one on another host (127.0.0.2) on faster ones (H200). Prefilling beside the
# decoder saves moving the KV cache, far away saves compute: which saves more
# depends on the model's KV bytes per token against its parameters.
WORKERS = [
    (name, module, model, gpu, far)
    for tag, model in (("s", SMALL), ("l", LARGE))
    for name, module, gpu, far in ((f"d-{tag}", "decode_svc", "H200", False),
                                   (f"p-{tag}-near", "prefill_svc", "H200-NVL", False),
                                   (f"p-{tag}-far", "prefill_svc", "H200", True))
]


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Testbed]:
    bed = Testbed(tmp_path)
    yield bed
    assert not bed.close(), "children left running"


async def wait_models(stub: inference_pb2_grpc.InferenceStub, models: list[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        listed = {m.name: m for m in (await stub.ListModels(inference_pb2.ListModelsRequest())).models}
        if all(m in listed and (listed[m].prefill_workers, listed[m].decode_workers) == (2, 1) for m in models):
            return
        assert time.monotonic() < deadline, f"router never saw 2P+1D per model: {listed}"
        await asyncio.sleep(0.05)


async def test_each_model_is_priced_by_the_shape_its_workers_publish(bed: Testbed) -> None:
    children = []
    for name, module, model, gpu, far in WORKERS:
        args = ["--engine", "sim", "--model", model, "--gpu-type", gpu, "--gpu-count", "2", "--speedup", "1000"]
        if far:
            args += ["--listen", "127.0.0.2:0", "--advertise-host", "127.0.0.2"]
        children.append(bed.start(name, module, *args, wait=False))
    for child in children:
        child.wait_ready(120)
    router = bed.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "16")

    # What the router's view is built from: each record carries its engine's shape.
    async with EtcdClient(EtcdSettings.parse(bed.etcd.endpoint)) as client:
        registry = Registry(client, Keys())
        for name, _, model, _, _ in WORKERS:
            entry = await registry.get(Kind.WORKER, name)
            assert entry is not None
            candidate = candidate_from_pb(entry.record)
            assert candidate is not None and candidate.shape is not None
            assert candidate.shape.params == pytest.approx(get_profile(model).active_params)
            assert candidate.shape.kv_bytes_per_token == get_profile(model).kv_bytes_per_token

    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await wait_models(stub, [SMALL, LARGE])
        sampling = common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)
        routes = {}
        for model in (SMALL, LARGE):
            reply = await stub.Complete(inference_pb2.GenerateRequest(model=model, prompt="x" * 2000,
                                                                      sampling=sampling), timeout=60)
            assert len(reply.token_ids) == 4
            routes[model] = reply.route
    # 8B: moving its KV (128 KiB per token for 7.5B parameters) costs more than the slower prefill.
    assert (routes[SMALL].prefill_worker_id, routes[SMALL].decode_worker_id) == ("p-s-near", "d-s")
    # 70B: compute dominates (320 KiB per token for 69.5B parameters); priced as an 8B it went near too.
    assert (routes[LARGE].prefill_worker_id, routes[LARGE].decode_worker_id) == ("p-l-far", "d-l")
