"""OpenAI JSON <-> Tandem's request and response types (router_svc.http_api.wire), with plain values."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router_svc.http_api import wire
from tandem.v1 import common_pb2, inference_pb2


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def refused(parse: Any, body: object, *needles: str) -> wire.ApiError:
    with pytest.raises(wire.ApiError) as info:
        parse(body)
    assert info.value.code == "INVALID_ARGUMENT"
    for needle in needles:
        assert needle in info.value.message
    return info.value


def test_a_completion_carries_every_sampling_field_to_the_generate_request() -> None:
    parsed = wire.parse_completion(completion(max_tokens=7, temperature=0.5, top_p=0.9, seed=42, stop=["\n", "END"],
                                              top_k=5, ignore_eos=True, user="alice", n=1), request_id="r-1")
    request = parsed.request
    assert (request.model, request.prompt, request.request_id) == ("m", "hi", "r-1")
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, list(s.stop), s.top_k, s.ignore_eos) == \
        (7, 0.5, pytest.approx(0.9), 42, ["\n", "END"], 5, True)
    assert not parsed.chat and not parsed.stream and not parsed.include_usage


def test_unset_fields_keep_tandems_defaults() -> None:
    s = wire.parse_completion(completion()).request.sampling
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not s.HasField(name), name
    assert list(s.stop) == []


def test_stop_may_be_one_string() -> None:
    assert list(wire.parse_completion(completion(stop="###")).request.sampling.stop) == ["###"]


@pytest.mark.parametrize("prompt", [[5, 6, 7], [[5, 6, 7]]])
def test_a_token_id_prompt_alone_or_in_a_batch_of_one(prompt: object) -> None:
    assert list(wire.parse_completion(completion(prompt=prompt)).request.prompt_token_ids) == [5, 6, 7]


def test_a_text_prompt_in_a_batch_of_one() -> None:
    assert wire.parse_completion(completion(prompt=["hello"])).request.prompt == "hello"


def test_batches_of_prompts_are_refused_with_what_to_do_instead() -> None:
    error = refused(wire.parse_completion, completion(prompt=["a", "b"]), "2 prompts", "one request each")
    assert error.param == "prompt"


@pytest.mark.parametrize(("body", "needles"), [
    (completion(n=2), ("n must be 1", "send 2 requests")),
    (completion(logprobs=1), ("logprobs is not supported",)),
    (completion(echo=True), ("echo is not supported",)),
    (completion(best_of=3), ("best_of",)),
    (completion(presence_penalty=0.5), ("presence_penalty is not supported",)),
    (completion(logit_bias={"5": 10}), ("logit_bias",)),
    (completion(max_tokens="ten"), ("max_tokens must be an integer", "the string 'ten'")),
    (completion(max_tokens=True), ("max_tokens must be an integer", "a boolean")),
    (completion(temperature="hot"), ("temperature must be a number",)),
    (completion(seed=-1), ("seed must be an integer 0..",)),
    (completion(stop=5), ("stop must be a string or a list of strings",)),
    (completion(stream="yes"), ("stream must be true or false",)),
    (completion(prompt={"text": "x"}), ("prompt must be a string or a list of token ids",)),
    (completion(prompt=[1, -2]), ("prompt token ids must be 0..",)),
    ({"prompt": "x"}, ("model is required",)),
    (["not", "an", "object"], ("must be a JSON object",)),
])
def test_what_the_router_cannot_do_is_refused_naming_the_field(body: object, needles: tuple[str, ...]) -> None:
    refused(wire.parse_completion, body, *needles)


def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    wire.parse_completion(completion(n=1, best_of=1, presence_penalty=0, frequency_penalty=0.0, logprobs=None,
                                     echo=False, logit_bias={}, suffix="", store=True, metadata={"a": "b"}))
    wire.parse_chat(chat(logprobs=False, top_logprobs=0, tools=[], tool_choice="none",
                         response_format={"type": "text"}, parallel_tool_calls=False))


def test_a_chat_keeps_its_messages_and_flattens_text_parts() -> None:
    parsed = wire.parse_chat({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None}]})
    assert [(m.role, m.content) for m in parsed.request.messages] == \
        [("system", "be brief"), ("user", "hello there"), ("assistant", "")]
    assert parsed.chat and parsed.add_generation_prompt


def test_a_chat_may_leave_the_assistants_turn_closed() -> None:
    assert not wire.parse_chat(chat(add_generation_prompt=False)).add_generation_prompt


def test_max_completion_tokens_is_max_tokens_and_the_two_must_agree() -> None:
    assert wire.parse_chat(chat(max_completion_tokens=9)).request.sampling.max_tokens == 9
    assert wire.parse_chat(chat(max_tokens=9, max_completion_tokens=9)).request.sampling.max_tokens == 9
    refused(wire.parse_chat, chat(max_tokens=8, max_completion_tokens=9), "disagree")


@pytest.mark.parametrize(("body", "needles"), [
    (chat(messages=[]), ("messages must be a non-empty list",)),
    (chat(messages="hi"), ("messages must be a non-empty list",)),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     ("messages[0].content[0] must be a text part", "image_url")),
    (chat(messages=[{"content": "hi"}]), ("messages[0].role must be a string",)),
    (chat(logprobs=True), ("logprobs is not supported",)),
    (chat(tools=[{"type": "function"}]), ("tools is not supported",)),
    (chat(response_format={"type": "json_object"}), ("response_format is not supported",)),
])
def test_chat_requests_the_router_cannot_serve_are_refused(body: object, needles: tuple[str, ...]) -> None:
    refused(wire.parse_chat, body, *needles)


def test_usage_is_streamed_only_when_asked_and_only_when_streaming() -> None:
    assert wire.parse_chat(chat(stream=True, stream_options={"include_usage": True})).include_usage
    assert not wire.parse_chat(chat(stream=True)).include_usage
    assert not wire.parse_chat(chat(stream=False, stream_options={"include_usage": True})).include_usage


def answer(text: str = "Paris", finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_STOP_TOKEN,
           ) -> inference_pb2.CompleteResponse:
    return inference_pb2.CompleteResponse(request_id="r-9", text=text, finish_reason=finish,
                                          usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=2,
                                                                 cached_prompt_tokens=1))


def test_a_non_streamed_chat_answer_has_the_assistants_message_and_usage() -> None:
    body = wire.completion_body(wire.parse_chat(chat()), 1700000000, answer())
    assert body["id"] == "chatcmpl-r-9" and body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"] == [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                "message": {"role": "assistant", "content": "Paris"}}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 1}}


def test_a_non_streamed_completion_answer_has_its_text() -> None:
    body = wire.completion_body(wire.parse_completion(completion()), 0,
                                answer("abc", common_pb2.FINISH_REASON_LENGTH))
    assert body["id"] == "cmpl-r-9" and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("value", "reason"), [
    (common_pb2.FINISH_REASON_LENGTH, "length"), (common_pb2.FINISH_REASON_CONTEXT_FULL, "length"),
    (common_pb2.FINISH_REASON_STOP_TOKEN, "stop"), (common_pb2.FINISH_REASON_STOP_STRING, "stop"),
])
def test_finish_reasons_map_to_openais_two(value: common_pb2.FinishReason.ValueType, reason: str) -> None:
    assert wire.finish_reason(value) == reason


def test_streamed_chat_chunks_open_with_the_role_and_end_with_the_reason_then_usage() -> None:
    parsed = wire.parse_chat(chat(stream=True, stream_options={"include_usage": True}))
    first = wire.text_chunk(parsed, "r", 5, "Pa", first=True)
    later = wire.text_chunk(parsed, "r", 5, "ris", first=False)
    last = wire.final_chunk(parsed, "r", 5, "", common_pb2.FINISH_REASON_STOP_TOKEN)
    usage = wire.usage_chunk(parsed, "r", 5, common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-r"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Pa"}
    assert later["choices"][0]["delta"] == {"content": "ris"} and later["usage"] is None
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5


def test_chunks_carry_no_usage_key_unless_asked() -> None:
    parsed = wire.parse_completion(completion(stream=True))
    chunk = wire.text_chunk(parsed, "r", 0, "x", first=True)
    assert "usage" not in chunk and chunk["choices"][0]["text"] == "x"


def test_an_event_is_one_data_line_of_json() -> None:
    event = wire.sse({"text": "é\n"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[len(b"data: "):]) == {"text": "é\n"}


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("INVALID_ARGUMENT", 400, "invalid_request_error"), ("FAILED_PRECONDITION", 400, "invalid_request_error"),
    ("UNAUTHENTICATED", 401, "authentication_error"), ("PERMISSION_DENIED", 403, "permission_error"),
    ("NOT_FOUND", 404, "not_found_error"), ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    ("UNAVAILABLE", 503, "service_unavailable_error"), ("DEADLINE_EXCEEDED", 504, "timeout_error"),
    ("INTERNAL", 500, "server_error"), ("SOMETHING_NEW", 500, "server_error"),
])
def test_errors_have_the_http_status_of_their_grpc_code(code: str, status: int, kind: str) -> None:
    assert wire.http_status(code) == status
    body = wire.error_body(code, "why", "field")
    assert body == {"error": {"message": "why", "type": kind, "param": "field", "code": body["error"]["code"]}}


def test_an_unknown_model_reads_as_openais_model_not_found() -> None:
    assert wire.error_body("NOT_FOUND", "unknown model 'x'; known: m")["error"]["code"] == "model_not_found"


def test_retry_after_is_whole_seconds_on_429_and_503_only() -> None:
    assert wire.retry_after_header("RESOURCE_EXHAUSTED", 0.2) == "1"
    assert wire.retry_after_header("RESOURCE_EXHAUSTED", 2.5) == "3"
    assert wire.retry_after_header("UNAVAILABLE", 0.0) == "1"
    assert wire.retry_after_header("INVALID_ARGUMENT", 5.0) is None


def test_models_list_in_openais_shape_with_the_routers_metadata() -> None:
    listed = inference_pb2.ListModelsResponse(models=[inference_pb2.ModelInfo(
        name="tiny", max_context_tokens=2048, max_output_tokens=512, prefill_workers=1, decode_workers=2, chat=True)])
    assert wire.models_body(listed, 7) == {"object": "list", "data": [
        {"id": "tiny", "object": "model", "created": 7, "owned_by": "tandem", "max_model_len": 2048,
         "max_output_tokens": 512, "prefill_workers": 1, "decode_workers": 2, "chat": True}]}


@pytest.mark.parametrize("text", ["", "hello", 'quotes " and \\ backslash', "line\nbreak\ttab", "héllo 🚀 你好",
                                  "\x00\x01 control", "\u2028 separators \u2029"])
@pytest.mark.parametrize("body", [completion(stream=True), chat(stream=True),
                                  completion(stream=True, stream_options={"include_usage": True})])
def test_templated_stream_events_are_the_same_bytes_as_the_rendered_chunks(text: str, body: dict[str, Any]) -> None:
    parse = wire.parse_chat if "messages" in body else wire.parse_completion
    parsed = parse(body, request_id="r-9")
    events = wire.TextEvents(parsed, "r-9", 1700000000)
    for first in (True, False):
        expected = wire.sse(wire.text_chunk(parsed, "r-9", 1700000000, text, first=first))
        assert events.event(text, first=first) == expected
        assert json.loads(expected[len(b"data: "):])["choices"][0]  # a valid event, as clients parse it
