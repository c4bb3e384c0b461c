"""OpenAI's JSON <-> Tandem's request and response types. Pure: plain values in, plain values out.

    parsed = parse_completion(body)          # POST /v1/completions, body = the decoded JSON
    parsed = parse_chat(body)                # POST /v1/chat/completions
    parsed.request                           # a tandem.v1.GenerateRequest for router_svc.inference
    completion_body(parsed, id, created, complete_response)        # the non-streamed answer
    text_chunk(...), final_chunk(...), usage_chunk(...)            # the streamed answer's events
    error_body(code, message), http_status(code)                   # errors, by gRPC code name

A request the router cannot serve as asked raises ApiError naming the field
and what it accepts: more than one choice (`n`), several prompts at once,
log probabilities, penalties, tools, non-text content. Fields OpenAI
clients send that change nothing here (`user`, `store`, `metadata`...) are
accepted and ignored; so are unknown fields, as OpenAI-compatible servers
do. Unset sampling fields keep Tandem's defaults (greedy, the model's
default max_tokens), the same as the gRPC API's.

Errors are keyed by gRPC status code *names* so the HTTP and gRPC fronts
answer one condition with matching statuses (Google's HTTP mapping of
gRPC codes: INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503...). No grpc, no sockets, no clock: the caller passes `created`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.text import clip
from tandem.v1 import common_pb2, inference_pb2

__all__ = [
    "SSE_DONE",
    "ApiError",
    "ParsedRequest",
    "TextEvents",
    "completion_body",
    "error_body",
    "final_chunk",
    "finish_reason",
    "http_status",
    "models_body",
    "parse_chat",
    "parse_completion",
    "response_id",
    "retry_after_header",
    "sse",
    "text_chunk",
    "usage_body",
    "usage_chunk",
]

MAX_UINT32 = 2**32 - 1
MAX_UINT64 = 2**64 - 1

_HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# OpenAI's `error.type` by HTTP status; SDKs pick their exception class by the status itself.
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    499: "cancelled",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTEXT_FULL: "length",
    common_pb2.FINISH_REASON_STOP_TOKEN: "stop",
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
}


class ApiError(Exception):
    """The request cannot be served as given: answer `code` (a gRPC status code name) with `message`."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError("INVALID_ARGUMENT", message, param)


@dataclass(frozen=True)
class ParsedRequest:
    """One OpenAI request as Tandem serves it."""

    chat: bool
    request: inference_pb2.GenerateRequest
    stream: bool
    # stream_options.include_usage: a last chunk with the usage (and `"usage": null` on the others).
    include_usage: bool
    add_generation_prompt: bool

    @property
    def model(self) -> str:
        return self.request.model


# -- parsing ----------------------------------------------------------------------------


def _what(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"{value!r}"
    if isinstance(value, str):
        return f"the string {clip(value, 40)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _int(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"{name} must be an integer {low}..{high}, got {_what(value)}", name)
    return value


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"{name} must be a number, got {_what(value)}", name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(f"{name} must be true or false, got {_what(value)}", name)
    return value


def _object(body: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{name} must be an object, got {_what(value)}", name)
    return value


def _unsupported(body: Mapping[str, Any], name: str, why: str, *, allowed: Sequence[object] = ()) -> None:
    value = body.get(name)
    if value is None or value in allowed or value in ({}, []):
        return
    raise _invalid(f"{name} is not supported: {why}", name)


def _common(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise _invalid(f"the request body must be a JSON object, got {_what(body)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(f"model is required (a string naming a model GET /v1/models lists), got {_what(model)}",
                       "model")
    n = _int(body, "n", 1, MAX_UINT32)
    if n not in (None, 1):
        raise _invalid(f"n must be 1 (one choice per request; send {n} requests instead), got {n}", "n")
    _unsupported(body, "best_of", "one completion is generated per request", allowed=(1,))
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, "the engines apply no penalties (leave it unset or 0)", allowed=(0, 0.0))
    _unsupported(body, "repetition_penalty", "the engines apply no penalties (leave it unset or 1)",
                 allowed=(1, 1.0))
    _unsupported(body, "logit_bias", "the engines apply no logit bias")
    _unsupported(body, "min_tokens", "the engines have no minimum length (leave it unset or 0)", allowed=(0,))
    return body


def _sampling(body: Mapping[str, Any], chat: bool) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams()
    max_tokens = _int(body, "max_tokens", 0, MAX_UINT32)
    if chat:
        completion = _int(body, "max_completion_tokens", 0, MAX_UINT32)
        if completion is not None and max_tokens is not None and completion != max_tokens:
            raise _invalid(f"max_tokens ({max_tokens}) and max_completion_tokens ({completion}) disagree; "
                           f"set one of them", "max_completion_tokens")
        max_tokens = completion if completion is not None else max_tokens
    if max_tokens is not None:
        params.max_tokens = max_tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            setattr(params, name, value)
    top_k = _int(body, "top_k", -1, MAX_UINT32)
    if top_k is not None:
        params.top_k = max(0, top_k)  # -1 (vLLM's "off") is 0 here
    seed = _int(body, "seed", 0, MAX_UINT64)
    if seed is not None:
        params.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        params.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params.stop.extend(stop)
    elif stop is not None:
        raise _invalid(f"stop must be a string or a list of strings, got {_what(stop)}", "stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_UINT32 for i in stop_ids):
            raise _invalid(f"stop_token_ids must be a list of token ids, got {_what(stop_ids)}", "stop_token_ids")
        params.stop_token_ids.extend(stop_ids)
    params.ignore_eos = _bool(body, "ignore_eos", False)
    return params


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    options = _object(body, "stream_options")
    return stream, stream and _bool(options, "include_usage", False)


def parse_completion(body: object, *, request_id: str = "") -> ParsedRequest:
    """POST /v1/completions: `prompt` is one string or one list of token ids (also each in a list of one)."""
    fields = _common(body)
    _unsupported(fields, "logprobs", "the engines return no log probabilities")
    _unsupported(fields, "echo", "the answer never repeats the prompt", allowed=(False,))
    _unsupported(fields, "suffix", "there is no insertion mode", allowed=("",))
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    request = inference_pb2.GenerateRequest(model=fields["model"], request_id=request_id,
                                            sampling=_sampling(fields, chat=False))
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t <= MAX_UINT32 for t in prompt):
            raise _invalid("prompt token ids must be 0..4294967295", "prompt")
        request.prompt_token_ids.extend(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise _invalid(f"prompt holds {len(prompt)} prompts; one request takes one prompt "
                       f"(send one request each)", "prompt")
    else:
        raise _invalid(f"prompt must be a string or a list of token ids, got {_what(prompt)}", "prompt")
    stream, include_usage = _stream(fields)
    return ParsedRequest(chat=False, request=request, stream=stream, include_usage=include_usage,
                         add_generation_prompt=True)


def _content(i: int, content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", "
                               f"\"text\": ...}}); this router serves text models only, got "
                               f"{clip(kind, 40) if kind else _what(part)}", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(f"messages[{i}].content must be a string or a list of text parts, got {_what(content)}",
                   "messages")


def parse_chat(body: object, *, request_id: str = "") -> ParsedRequest:
    """POST /v1/chat/completions: `messages` (text content) rendered later with the model's chat template."""
    fields = _common(body)
    _unsupported(fields, "logprobs", "the engines return no log probabilities", allowed=(False,))
    _unsupported(fields, "top_logprobs", "the engines return no log probabilities", allowed=(0,))
    for name in ("tools", "functions"):
        _unsupported(fields, name, "the router does no tool calling")
    _unsupported(fields, "tool_choice", "the router does no tool calling", allowed=("none",))
    response_format = fields.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _invalid("response_format is not supported: the router does no constrained decoding "
                       "(leave it unset or {\"type\": \"text\"})", "response_format")
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid(f"messages must be a non-empty list of {{\"role\": ..., \"content\": ...}}, "
                       f"got {_what(messages)}", "messages")
    request = inference_pb2.GenerateRequest(model=fields["model"], request_id=request_id,
                                            sampling=_sampling(fields, chat=True))
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}] must be an object with role and content, got {_what(message)}",
                           "messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise _invalid(f"messages[{i}].role must be a string, got {_what(role)}", "messages")
        request.messages.append(inference_pb2.ChatMessage(role=role, content=_content(i, message.get("content"))))
    stream, include_usage = _stream(fields)
    return ParsedRequest(chat=True, request=request, stream=stream, include_usage=include_usage,
                         add_generation_prompt=_bool(fields, "add_generation_prompt", True))


# -- answers ----------------------------------------------------------------------------


def response_id(parsed: ParsedRequest, request_id: str) -> str:
    """The answer's `id`: the router's request id (as in its logs and metrics) behind OpenAI's prefix."""
    return ("chatcmpl-" if parsed.chat else "cmpl-") + request_id


def finish_reason(value: common_pb2.FinishReason.ValueType) -> str:
    """OpenAI's finish_reason for a tandem.v1 FinishReason: "length" or "stop"."""
    return _FINISH.get(value, "stop")


def usage_body(usage: common_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def completion_body(parsed: ParsedRequest, created: int, answer: inference_pb2.CompleteResponse) -> dict[str, Any]:
    """The non-streamed answer (`text_completion` or `chat.completion`), with usage."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(answer.finish_reason), "logprobs": None}
    if parsed.chat:
        choice["message"] = {"role": "assistant", "content": answer.text}
    else:
        choice["text"] = answer.text
    return {"id": response_id(parsed, answer.request_id),
            "object": "chat.completion" if parsed.chat else "text_completion",
            "created": created, "model": parsed.model, "system_fingerprint": None,
            "choices": [choice], "usage": usage_body(answer.usage)}


def _chunk(parsed: ParsedRequest, request_id: str, created: int, choices: list[dict[str, Any]],
           usage: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": response_id(parsed, request_id),
                             "object": "chat.completion.chunk" if parsed.chat else "text_completion",
                             "created": created, "model": parsed.model, "system_fingerprint": None,
                             "choices": choices}
    if parsed.include_usage:
        chunk["usage"] = usage
    return chunk


def text_chunk(parsed: ParsedRequest, request_id: str, created: int, text: str, *, first: bool) -> dict[str, Any]:
    """A streamed piece of the answer; a chat's first one also carries the assistant's role."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None}
    if parsed.chat:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    return _chunk(parsed, request_id, created, [choice])


def final_chunk(parsed: ParsedRequest, request_id: str, created: int, text: str,
                finish: common_pb2.FinishReason.ValueType) -> dict[str, Any]:
    """The chunk with the finish reason (and the last text, if any)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(finish), "logprobs": None}
    if parsed.chat:
        choice["delta"] = {"content": text} if text else {}
    else:
        choice["text"] = text
    return _chunk(parsed, request_id, created, [choice])


def usage_chunk(parsed: ParsedRequest, request_id: str, created: int, usage: common_pb2.Usage) -> dict[str, Any]:
    """stream_options.include_usage: the extra last chunk, with no choices and the request's usage."""
    return _chunk(parsed, request_id, created, [], usage_body(usage))


def sse(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

# A text no request id, model name or created time can contain (they are printable ASCII); JSON writes it
# as "\u0001", which marks where each event's text goes in the rendered template.
_TEXT_MARK = "\x01"
_encode_text = json.encoder.encode_basestring  # the C encoder json.dumps uses for a str


class TextEvents:
    """The streamed text events of one answer, rendered once and filled per event.

    `event(text, first)` returns exactly `sse(text_chunk(...))`, but encodes
    only the text: the envelope (id, model, created, ...) is the same for
    every event of a stream, and a stream has one event per token batch.
    """

    __slots__ = ("_first", "_rest")

    def __init__(self, parsed: ParsedRequest, request_id: str, created: int) -> None:
        self._first = self._template(parsed, request_id, created, first=True)
        self._rest = self._template(parsed, request_id, created, first=False)

    @staticmethod
    def _template(parsed: ParsedRequest, request_id: str, created: int, *, first: bool) -> tuple[bytes, bytes]:
        rendered = sse(text_chunk(parsed, request_id, created, _TEXT_MARK, first=first))
        head, tail = rendered.split(json.dumps(_TEXT_MARK).encode())
        return head, tail

    def event(self, text: str, *, first: bool) -> bytes:
        head, tail = self._first if first else self._rest
        return head + _encode_text(text).encode() + tail


def models_body(models: inference_pb2.ListModelsResponse, created: int) -> dict[str, Any]:
    """GET /v1/models: OpenAI's list, each model with its limits and routable workers."""
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": created, "owned_by": "tandem",
         "max_model_len": m.max_context_tokens, "max_output_tokens": m.max_output_tokens,
         "prefill_workers": m.prefill_workers, "decode_workers": m.decode_workers, "chat": m.chat}
        for m in models.models]}


# -- errors -----------------------------------------------------------------------------


def http_status(code: str) -> int:
    """The HTTP status for a gRPC status code name (500 for any not listed)."""
    return _HTTP_STATUS.get(code, 500)


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    status = http_status(code)
    if status == 404 and message.startswith("unknown model"):
        error_code = "model_not_found"
    elif status == 401:
        error_code = "invalid_api_key"
    else:
        error_code = code.lower()
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": error_code}}


def retry_after_header(code: str, retry_after_s: float) -> str | None:
    """Retry-After (whole seconds, at least 1) for 429 and 503 answers; None for the others."""
    if http_status(code) not in (429, 503):
        return None
    return str(max(1, math.ceil(retry_after_s)))
