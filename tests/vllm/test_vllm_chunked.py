"""The prompt's KV is exported whole when vLLM's chunked prefill computes it over several engine steps.

An in-process VllmEngine whose steps hold 64 tokens at most: a 200-token
prompt is prefilled in four chunks, and the KV exported after the last one
must be the whole prompt's (decode from it equals the unified run, and it
equals the torch engine's KV of the same checkpoint).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from engine.base import DecodeRequest, EngineConfig, PrefillRequest, Sampling, create_engine
from tests.vllm.conftest import BLOCK

# The engine lives on one event loop for the module: its tests run on that loop too.
pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

STEP_TOKENS = 64


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chunked(vllm_cache: Path) -> AsyncIterator[object]:
    engine = create_engine("vllm", EngineConfig(
        model="tiny-vllm", cache_dir=str(vllm_cache), kv_block_size=BLOCK, kv_blocks=64, max_batch_size=4,
        extra={"max_num_batched_tokens": str(STEP_TOKENS)}))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def run(engine: object, request: DecodeRequest) -> list[int]:
    return [t async for step in engine.decode(request) for t in step.token_ids]  # type: ignore[attr-defined]


@pytest.mark.parametrize("length", [3 * STEP_TOKENS + 8, STEP_TOKENS])
async def test_chunked_prefill_exports_the_whole_prompt(chunked, checkpoint: Path, length: int) -> None:
    prompt = tuple((i * 11 + 7) % 500 + 1 for i in range(length))
    sampling = Sampling(max_tokens=10, ignore_eos=True)
    whole = await run(chunked, DecodeRequest("u", prompt, sampling))
    result = await chunked.prefill(PrefillRequest("p", prompt, sampling))
    assert result.kv is not None and result.kv.num_tokens == length
    split = await run(chunked, DecodeRequest("d", prompt, sampling, kv=result.kv, first_token=result.first_token))
    assert [result.first_token, *split] == whole
    reference = create_engine("torch", EngineConfig(model=str(checkpoint)))
    await reference.start()
    try:
        theirs = await reference.prefill(PrefillRequest("t", prompt, sampling))
    finally:
        await reference.close()
    assert theirs.kv is not None
    a = torch.frombuffer(bytearray(result.kv.data), dtype=torch.float32)
    b = torch.frombuffer(bytearray(theirs.kv.data), dtype=torch.float32)
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), float((a - b).abs().max())
