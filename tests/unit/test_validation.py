"""Request validation: each bad field gets the right status and a message naming it."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from router_svc.validation import (
    MAX_BYTES_PER_TOKEN,
    MAX_CHAT_MESSAGES,
    ModelLimits,
    RequestError,
    check_prompt,
    valid_request_id,
    validate_generate,
)
from runtime import sampling
from tandem.v1 import common_pb2, inference_pb2

MODELS = {
    "llama": ModelLimits("llama", max_context_tokens=8192, max_output_tokens=8192, default_max_tokens=256,
                         vocab_size=32000),
    "tiny": ModelLimits("tiny", max_context_tokens=512, max_output_tokens=128, default_max_tokens=1000),
}


def gen(model: str = "llama", prompt: str = "hi", **sampling: Any) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt)
    if sampling:
        request.sampling.CopyFrom(common_pb2.SamplingParams(**sampling))
    return request


def error_of(request: inference_pb2.GenerateRequest) -> RequestError:
    with pytest.raises(RequestError) as err:
        validate_generate(request, MODELS)
    return err.value


def test_a_plain_request_gets_the_models_defaults() -> None:
    valid = validate_generate(gen(), MODELS, new_request_id=lambda: "req-1")
    assert valid.request_id == "req-1" and valid.model.name == "llama"
    assert valid.prompt == "hi" and valid.prompt_token_ids is None
    s = valid.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (256, 0.0, 1.0, 0, None, ())
    assert not valid.max_tokens_explicit


def test_sampling_values_are_carried_over() -> None:
    valid = validate_generate(
        gen(max_tokens=10, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=["\n"], stop_token_ids=[2],
            ignore_eos=True),
        MODELS,
    )
    s = valid.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (10, 0.7, 0.9, 40, 7)
    assert (s.stop, s.stop_token_ids, s.ignore_eos) == (("\n",), (2,), True)
    assert valid.max_tokens_explicit


def test_default_max_tokens_is_capped_by_the_models_output_limit() -> None:
    assert validate_generate(gen("tiny"), MODELS).sampling.max_tokens == 128


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be 1..8192, got 0"),
        ({"max_tokens": 9000}, "max_tokens must be 1..8192, got 9000"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"temperature": -0.5}, "temperature must be 0..100, got -0.5"),
        ({"temperature": float("nan")}, "temperature must be 0..100, got nan"),
        ({"temperature": float("inf")}, "temperature must be 0..100, got inf"),
        ({"temperature": 101.0}, "temperature must be 0..100, got 101.0"),
        ({"top_k": 2**32 - 1}, "top_k must be 0..1048576 (0: off), got 4294967295"),
        ({"top_k": 2**20 + 1}, "top_k must be 0..1048576 (0: off), got 1048577"),
        ({"stop": ["ok", ""]}, "stop strings must not be empty"),
        ({"stop": ["x"] * 17}, "stop takes at most 16 strings, got 17"),
        ({"stop": ["x" * 300]}, "stop[0] must be 1..256 characters, got 300"),
        ({"stop_token_ids": [5, 32000]}, "stop_token_ids[1] is 32000; model 'llama' has token ids 0..31999"),
    ],
)
def test_bad_sampling_is_invalid_argument_naming_the_field(sampling: dict[str, Any], message: str) -> None:
    err = error_of(gen(**sampling))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == message
    assert str(err) == f"INVALID_ARGUMENT: {message}"


def test_output_limit_is_the_models() -> None:
    assert error_of(gen("tiny", max_tokens=129)).message == "max_tokens must be 1..128, got 129"


def test_unknown_model_is_not_found_listing_the_known_ones() -> None:
    err = error_of(gen("gpt-9"))
    assert err.code is grpc.StatusCode.NOT_FOUND
    assert err.message == "unknown model 'gpt-9'; known: llama, tiny"
    with pytest.raises(RequestError, match="no models are configured"):
        validate_generate(gen("gpt-9"), {})


def test_model_is_required() -> None:
    err = error_of(gen(""))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and err.message.startswith("model is required")


def test_exactly_one_of_prompt_and_token_ids() -> None:
    assert error_of(gen(prompt="")).message == "prompt is empty"
    both = gen()
    both.prompt_token_ids.extend([1, 2])
    assert error_of(both).message == "set exactly one of prompt, prompt_token_ids and messages"
    chat_and_ids = inference_pb2.GenerateRequest(model="llama", prompt_token_ids=[1])
    chat_and_ids.messages.add(role="user", content="hi")
    assert error_of(chat_and_ids).message == "set exactly one of prompt, prompt_token_ids and messages"


def test_a_chat_is_kept_as_messages_and_bounded() -> None:
    request = inference_pb2.GenerateRequest(model="llama")
    request.messages.add(role="system", content="Be brief.")
    request.messages.add(role="user", content="héllo")
    valid = validate_generate(request, MODELS)
    assert valid.prompt is None and valid.prompt_token_ids is None
    assert [(m.role, m.content) for m in valid.messages or ()] == [("system", "Be brief."), ("user", "héllo")]
    huge = inference_pb2.GenerateRequest(model="llama")
    for _ in range(MAX_CHAT_MESSAGES + 1):
        huge.messages.add(role="user", content="x")
    assert error_of(huge).message == f"messages takes at most {MAX_CHAT_MESSAGES} turns, got {MAX_CHAT_MESSAGES + 1}"


def test_prompt_token_ids_are_range_checked() -> None:
    request = inference_pb2.GenerateRequest(model="llama", prompt_token_ids=[1, 2, 40000])
    assert error_of(request).message == "prompt_token_ids[2] is 40000; model 'llama' has token ids 0..31999"
    ok = inference_pb2.GenerateRequest(model="llama", prompt_token_ids=[1, 2, 3])
    assert validate_generate(ok, MODELS).prompt_token_ids == (1, 2, 3)


@pytest.mark.parametrize(
    ("given", "kept"),
    [("client-42", True), ("a" * 128, True), ("with space ~", True), ("", False), ("a" * 129, False),
     ("tab\there", False), ("naïve", False)],
)
def test_request_id_is_the_clients_when_valid(given: str, kept: bool) -> None:
    request = gen()
    request.request_id = given
    valid = validate_generate(request, MODELS, new_request_id=lambda: "generated")
    assert valid.request_id == (given if kept else "generated")
    assert valid_request_id(given) is kept


def test_generated_request_ids_are_unique() -> None:
    ids = {validate_generate(gen(), MODELS).request_id for _ in range(100)}
    assert len(ids) == 100 and all(valid_request_id(i) for i in ids)


def test_prompt_too_long_for_the_context() -> None:
    valid = validate_generate(gen(max_tokens=16), MODELS)
    with pytest.raises(RequestError) as err:
        check_prompt(valid, [1] * 9000)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message == (
        "prompt has 9000 tokens and max_tokens is 16; model 'llama' takes at most 8192 tokens (including max_tokens)"
    )


def test_explicit_max_tokens_must_fit_but_the_default_shrinks() -> None:
    explicit = validate_generate(gen(max_tokens=300), MODELS)
    with pytest.raises(RequestError, match="prompt has 8000 tokens and max_tokens is 300"):
        check_prompt(explicit, [1] * 8000)
    fitted = check_prompt(validate_generate(gen(), MODELS), [1] * 8000)
    assert fitted.sampling.max_tokens == 192 and fitted.prompt_token_ids == (1,) * 8000
    with pytest.raises(RequestError, match="prompt has 8192 tokens"):
        check_prompt(validate_generate(gen(), MODELS), [1] * 8192)


def test_a_prompt_that_tokenizes_to_nothing_is_empty() -> None:
    with pytest.raises(RequestError, match="prompt is empty"):
        check_prompt(validate_generate(gen(), MODELS), [])


def test_tokenized_prompt_ids_are_range_checked() -> None:
    with pytest.raises(RequestError, match=r"prompt_token_ids\[1\] is 32001"):
        check_prompt(validate_generate(gen(), MODELS), [5, 32001])


@pytest.mark.parametrize("ids", [[], [5, 32001], [1] * 8000, [1] * 8192])
def test_router_and_workers_share_one_prompt_rule(ids: list[int]) -> None:
    """With an explicit max_tokens the router checks a prompt exactly as a worker does, message and all."""
    with pytest.raises(RequestError) as router:
        check_prompt(validate_generate(gen(max_tokens=300), MODELS), ids)
    with pytest.raises(sampling.InvalidRequest) as worker:
        sampling.check_prompt(ids, vocab_size=32000, max_context_tokens=8192, max_tokens=300, model="llama")
    assert router.value.message == str(worker.value)


def test_token_ids_beyond_the_context_are_refused_before_any_per_id_work() -> None:
    # 600 ids > tiny's 512; an id far outside any vocabulary shows no per-id check ran first.
    err = error_of(inference_pb2.GenerateRequest(model="tiny", prompt_token_ids=[10**9] * 600))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_token_ids has 600 ids" in err.message and "at most 512 tokens" in err.message
    # At the limit, the ids pass this check (the context check after tokenizing is check_prompt's).
    assert validate_generate(inference_pb2.GenerateRequest(model="tiny", prompt_token_ids=[1] * 512), MODELS)


def test_text_longer_than_the_context_can_hold_is_refused_before_tokenizing() -> None:
    limit = MODELS["tiny"].max_prompt_bytes
    assert limit == 512 * MAX_BYTES_PER_TOKEN
    assert validate_generate(gen("tiny", "a" * limit), MODELS).prompt == "a" * limit
    err = error_of(gen("tiny", "a" * (limit + 1)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt is {limit + 1} characters" in err.message and "at most 512 tokens" in err.message
    # Bytes, not characters: a 4-byte character counts 4.
    err = error_of(gen("tiny", "\U0001F600" * (limit // 4 + 1)))
    assert f"prompt is {4 * (limit // 4 + 1)} bytes" in err.message


def test_chat_content_is_bounded_in_total() -> None:
    limit = MODELS["tiny"].max_prompt_bytes
    half = inference_pb2.ChatMessage(role="user", content="a" * (limit // 2))
    assert validate_generate(inference_pb2.GenerateRequest(model="tiny", messages=[half, half]), MODELS)
    err = error_of(inference_pb2.GenerateRequest(model="tiny", messages=[half, half, half]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages' content is" in err.message and "at most 512 tokens" in err.message
