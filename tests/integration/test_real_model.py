"""The built-in real model (SmolLM2-135M-Instruct) across real worker processes: real text, real KV.

Where text matters, tests run here: disaggregated output equals unified output
token for token over every KV transport, on chat-templated and raw prompts
(non-ASCII included), and every answer is valid UTF-8 that reads like an
answer. The model is converted once into the cache from the packaged GGUF
file (about 20 s on 2 cores), then each worker loads it in about 3 s.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
TRANSPORTS = ("grpc", "shm", "tcp")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from engine import builtin_models
    from engine.hf_tokenizer import load_tokenizer

    # Converts the model once for the whole run (the workers below find it in the cache).
    checkpoint = builtin_models.resolve(MODEL)
    assert checkpoint is not None
    return load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Iterator[Testbed]:
    bed = Testbed(tmp_path_factory.mktemp("real-model"), shutdown_grace=5)
    args = ("--engine", "torch", "--model", MODEL, "--max-batch-size", "4")
    bed.start("p", "prefill_svc", *args, "--kv-transports", ",".join(TRANSPORTS), wait=False)
    # Decode workers accept only the transports they list: tcp must be named to be pulled.
    bed.start("d", "decode_svc", *args, "--kv-transports", ",".join(TRANSPORTS), wait=False)
    # Prompts of 8 tokens or fewer prefill on the decode worker; longer ones go through the prefill worker.
    bed.start("r", "router_svc", "--local-prefill-max-prompt-tokens", "8", wait=False)
    try:
        for child in bed.children.values():
            child.wait_ready(180)
        yield bed
    finally:
        assert not bed.close(), "children left running"


@pytest.fixture
async def stubs(fleet: Testbed) -> AsyncIterator[dict[str, Any]]:
    channels = {name: grpc.aio.insecure_channel(child.endpoint) for name, child in fleet.children.items()}
    yield {"prefill": worker_pb2_grpc.PrefillStub(channels["p"]), "decode": worker_pb2_grpc.DecodeStub(channels["d"])}
    for channel in channels.values():
        await channel.close()


async def disaggregated(stubs: dict[str, Any], prompt: list[int], sampling: common_pb2.SamplingParams,
                        transport: str) -> list[int]:
    reply = await stubs["prefill"].Prefill(worker_pb2.PrefillRequest(
        model=MODEL, prompt_token_ids=prompt, sampling=sampling, kv_transports=[transport],
        consumer_host=socket.gethostname()), timeout=60)
    tokens = [reply.first_token_id]
    if not reply.HasField("handle"):
        return tokens
    assert reply.handle.transport == transport
    async for step in stubs["decode"].Decode(worker_pb2.DecodeRequest(
            model=MODEL, prompt_token_ids=prompt, sampling=sampling, handle=reply.handle,
            first_token_id=reply.first_token_id), timeout=60):
        tokens.extend(step.token_ids)
    return tokens


async def unified(stubs: dict[str, Any], prompt: list[int], sampling: common_pb2.SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for step in stubs["decode"].Decode(worker_pb2.DecodeRequest(
            model=MODEL, prompt_token_ids=prompt, sampling=sampling), timeout=60):
        tokens.extend(step.token_ids)
    return tokens


@pytest.fixture
def router(fleet: Testbed) -> Iterator[Any]:
    from router_svc.client import TandemClient

    with TandemClient(fleet.children["r"].endpoint, timeout=120) as client:
        yield client


def chat(tokenizer: Any, text: str) -> list[int]:
    from engine.chat_template import ChatMessage

    return list(tokenizer.encode_rendered_chat(tokenizer.chat_template.render([ChatMessage("user", text)])))


QUESTIONS = ["What is the capital of France?", "Écris une phrase en français sur le café.",
             "Translate 'good morning' into Japanese.", "Name three colours of the rainbow."]
RAW = ["The capital of Germany is", "Once upon a time, in a small village,"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_disaggregated_equals_unified_on_real_text(stubs, tokenizer, transport: str) -> None:  # type: ignore[no-untyped-def]
    greedy = common_pb2.SamplingParams(max_tokens=24)
    seeded = common_pb2.SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=11)
    prompts = [chat(tokenizer, q) for q in QUESTIONS] + [tokenizer.encode(text) for text in RAW]
    for prompt in prompts:
        for sampling in (greedy, seeded):
            split = await disaggregated(stubs, prompt, sampling, transport)
            whole = await unified(stubs, prompt, sampling)
            assert split == whole, f"{tokenizer.decode(prompt)[-40:]!r} temperature={sampling.temperature}"
            text = tokenizer.decode(whole)
            # A cut at max_tokens may leave half a character at the very end; nowhere else.
            assert "\ufffd" not in text.rstrip("\ufffd"), text
            assert text.strip(), "an empty answer"


async def test_answers_are_real_text(stubs, tokenizer) -> None:  # type: ignore[no-untyped-def]
    answer = tokenizer.decode(await unified(stubs, chat(tokenizer, "What is the capital of France?"),
                                            common_pb2.SamplingParams(max_tokens=24)))
    assert "Paris" in answer, answer
    assert "\ufffd" not in answer


def test_the_router_renders_chats_with_the_models_template(router: Any) -> None:
    from router_svc.client_errors import TandemError

    (info,) = router.list_models()
    assert (info.name, info.chat) == (MODEL, True)
    answer = router.complete(messages=[{"role": "user", "content": "What is the capital of France?"}], model=MODEL,
                             max_tokens=24)
    assert "Paris" in answer.text and answer.finish_reason == "stop_token", answer
    assert answer.route is not None and not answer.route.local_prefill  # a 30-token prompt: disaggregated
    with_system = router.complete(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"}], model=MODEL, max_tokens=24)
    # The template puts its own long system prompt first only when the chat has none.
    assert with_system.usage is not None and answer.usage is not None
    assert with_system.usage.prompt_tokens < answer.usage.prompt_tokens
    assert "Paris" in with_system.text
    with pytest.raises(TandemError, match=r"messages\[0\]\.role must be one of"):
        router.complete(messages=[{"role": "narrator", "content": "x"}], model=MODEL)


def test_streamed_text_equals_the_unary_answer(router: Any) -> None:
    for kwargs in ({"messages": [{"role": "user", "content": "Écris deux phrases sur le café, avec des accents."}]},
                   {"prompt": "Hi"},  # local prefill
                   {"prompt": "A haiku about GPUs:\n"}):
        whole = router.complete(model=MODEL, max_tokens=40, **kwargs)
        chunks = list(router.generate(model=MODEL, max_tokens=40, **kwargs))
        assert "".join(c.text for c in chunks) == whole.text, kwargs
        assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
        assert "\ufffd" not in whole.text.rstrip("\ufffd")


def test_a_stop_string_that_occurs_in_the_answer_ends_it_there(router: Any) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    full = router.complete(messages=question, model=MODEL, max_tokens=24).text
    assert " is " in full
    stopped = router.complete(messages=question, model=MODEL, max_tokens=24, stop=[" is "])
    assert stopped.finish_reason == "stop_string"
    assert stopped.text == full[:full.index(" is ")]
    streamed = list(router.generate(messages=question, model=MODEL, max_tokens=24, stop=[" is "]))
    assert "".join(c.text for c in streamed) == stopped.text and streamed[-1].finish_reason == "stop_string"
