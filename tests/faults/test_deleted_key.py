"""A live worker's registry key deleted by hand (`etcdctl del`) comes back by itself.

The promise (docs/registry.md, "Rules"): a process whose bound key vanishes
while its lease lives re-creates it at its next keepalive (within TTL/3),
under the same lease, and the router routes to it again.
"""

from __future__ import annotations

import time

import grpc
import pytest

from registry.keys import Keys
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.faults.conftest import MODEL, SIM, TTL, Fleet, wait_models, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.integration]


async def test_a_deleted_worker_key_is_restored_under_the_same_lease(fleet: Fleet) -> None:
    fleet.start("p0", "prefill_svc", *SIM, "--speedup", "50")
    fleet.start("d0", "decode_svc", *SIM, "--speedup", "50")
    router = fleet.start("router", "router_svc", "--local-prefill-max-prompt-tokens", "8")
    await wait_models(router.endpoint, 1, 1)
    key = Keys().worker("d0")
    async with fleet.client() as client:
        before = await client.get(key)
        assert before is not None and before.lease
        assert await client.delete(key)
        deleted_at = time.monotonic()
        healed = await wait_until(lambda: client.get(key), 10 * TTL, f"{key} re-created")
        heal_s = time.monotonic() - deleted_at
        assert healed.lease == before.lease, "restored under another lease: the session re-granted instead of healing"
        assert healed.create_revision > before.create_revision and healed.value == before.value
    print(f"\n{key} restored {heal_s:.2f} s after deletion (keepalive interval {TTL / 3:.2f} s)")
    await wait_models(router.endpoint, 1, 1)
    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = await stub.Complete(inference_pb2.GenerateRequest(
            model=MODEL, prompt_token_ids=list(range(1, 40)),
            sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)), timeout=30)
    assert reply.route.decode_worker_id == "d0" and len(reply.token_ids) == 4
