"""vLLM prefill worker -> Tandem KV transport -> vLLM decode worker, against one vLLM worker doing it all.

Real processes throughout (tests/vllm/conftest.py): the KV cache leaves
vLLM's paged blocks in one engine core, crosses a Tandem transport, and
lands in the blocks another engine core allocated.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from engine.kv.exporter import fetch_kv
from tandem.v1 import common_pb2, worker_pb2
from tests.vllm.conftest import BLOCK, MODEL, TORCH_MODEL, TRANSPORTS, decode, greedy, prefill

pytestmark = pytest.mark.integration

# Block-boundary prompt lengths: one token, one short of a block, a block, one past it, two blocks.
LENGTHS = (1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK)
TEXT = "Grüße aus Köln: 你好世界, こんにちは, привет мир 🚀"
_unified: dict[tuple[int, ...], list[int]] = {}


def numbered(length: int, salt: int = 0) -> list[int]:
    return [(i * 7 + 3 + salt) % 500 + 1 for i in range(length)]


def prompts(tokenizer: Any) -> list[list[int]]:
    return [numbered(n) for n in LENGTHS] + [list(tokenizer.encode(TEXT))]


async def unified(stubs: dict[str, Any], prompt: list[int]) -> list[int]:
    """The decode worker's own run of `prompt` (greedy, 12 tokens), computed once per prompt."""
    key = tuple(prompt)
    if key not in _unified:
        _unified[key] = await decode(stubs, prompt, greedy())
    return _unified[key]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_disaggregated_equals_unified(stubs, tokenizer, transport: str) -> None:
    for prompt in prompts(tokenizer):
        reply = await prefill(stubs["prefill"], prompt, greedy(), transport)
        assert reply.handle.transport == transport
        assert reply.handle.num_tokens == len(prompt)
        split = await decode(stubs, prompt, greedy(), reply)
        whole = await unified(stubs, prompt)
        assert len(whole) == 12
        assert split == whole, f"prompt of {len(prompt)} tokens over {transport}"


async def test_imported_kv_is_used_not_recomputed(stubs) -> None:
    """Control: the decode worker fed another prompt's KV continues differently, so it reads the KV it was given."""
    prompt, other = numbered(BLOCK + 1), numbered(BLOCK + 1, salt=101)
    right = await prefill(stubs["prefill"], prompt, greedy())
    wrong = await prefill(stubs["prefill"], other, greedy())
    honest = await decode(stubs, prompt, greedy(), right)
    # The handle of `other` (same length, so every check passes) with `prompt`'s first token.
    wrong.first_token_id = right.first_token_id
    injected = await decode(stubs, prompt, greedy(), wrong)
    assert honest == await unified(stubs, prompt)
    assert injected[0] == honest[0]
    assert injected[1:] != honest[1:]


async def test_vllm_kv_holds_what_the_torch_engine_computes(stubs, checkpoint) -> None:
    """The exported payload is the prompt's K and V per position: equal (to float rounding) to the torch engine's."""
    import torch

    prompt = numbered(BLOCK + 5)
    mine = await fetch_kv((await prefill(stubs["prefill"], prompt, greedy())).handle)
    reference = await fetch_kv((await prefill(stubs["torch_prefill"], prompt, greedy(), model=TORCH_MODEL)).handle)
    assert mine.nbytes == reference.nbytes
    a = torch.frombuffer(bytearray(mine.data), dtype=torch.float32)
    b = torch.frombuffer(bytearray(reference.data), dtype=torch.float32)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), float((a - b).abs().max())


async def test_torch_engine_kv_is_refused_before_any_byte_moves(stubs) -> None:
    prompt = numbered(BLOCK)
    reply = await prefill(stubs["torch_prefill"], prompt, greedy(), model=TORCH_MODEL)
    assert reply.HasField("handle")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await decode(stubs, prompt, greedy(), reply)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_fingerprint" in (caught.value.details() or "")
    # Nothing was pulled: the torch worker still holds the handle, and it can be fetched once.
    blob = await fetch_kv(reply.handle)
    assert blob.num_tokens == len(prompt)


async def test_migrated_sequence_continues_exactly(stubs) -> None:
    """DecodeRequest.generated: tokens another worker delivered are recomputed, not repeated; greedy stays exact."""
    prompt = numbered(BLOCK + 3)
    whole = await unified(stubs, prompt)
    for cut in (1, 5):
        tail = await decode(stubs, prompt, greedy(), generated=whole[:cut])
        assert tail == whole[cut:]
    # Migrated right after a disaggregated prefill: the handle, its first token and the tokens since.
    reply = await prefill(stubs["prefill"], prompt, greedy())
    assert reply.first_token_id == whole[0]
    tail = await decode(stubs, prompt, greedy(), reply, generated=whole[:4])
    assert tail == [whole[0], *whole[4:]]


async def test_seeded_sampling_guarantees(stubs) -> None:
    """What docs/engines.md promises for seeded sampling on vLLM, and nothing more.

    - a seeded run repeats exactly on the same path (unified twice; disaggregated twice);
    - the disaggregated run's first token (sampled by the prefill worker) is the unified run's first token.
    Tokens after the first come from the decode request's own generator, so they are not promised equal.
    """
    prompt = numbered(BLOCK + 2)
    seeded = common_pb2.SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    whole = [await decode(stubs, prompt, seeded) for _ in range(2)]
    split = [await decode(stubs, prompt, seeded, await prefill(stubs["prefill"], prompt, seeded)) for _ in range(2)]
    assert whole[0] == whole[1]
    assert split[0] == split[1]
    assert split[0][0] == whole[0][0]
    other_seed = common_pb2.SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True)
    assert await decode(stubs, prompt, other_seed) != whole[0]


async def test_stop_strings_are_tandems(stubs, tokenizer) -> None:
    """Tandem's stop rule ends a vLLM sequence on a stop string, with the finish reason the torch engine gives."""
    prompt = numbered(BLOCK)
    whole = await unified(stubs, prompt)
    stop = tokenizer.decode(whole[6:8])
    assert stop.strip("\ufffd")
    sampling = common_pb2.SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop])
    steps = [step async for step in stubs["decode"].Decode(
        worker_pb2.DecodeRequest(model=MODEL, prompt_token_ids=prompt, sampling=sampling), timeout=120)]
    tokens = [t for step in steps for t in step.token_ids]
    assert steps[-1].finish_reason == common_pb2.FINISH_REASON_STOP_STRING
    assert stop in tokenizer.decode(tokens)
    assert tokens == whole[:len(tokens)] and len(tokens) <= 8
