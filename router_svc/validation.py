"""GenerateRequest -> a validated request, or an error with the gRPC status to answer. Pure.

Two steps, because the prompt's length in tokens is known only after
tokenizing, which the servicer does in between:

    valid = validate_generate(request, models)      # before tokenizing
    valid = check_prompt(valid, token_ids)          # after tokenizing (or as given)

`validate_generate` also bounds the prompt's size before anything costs
time in proportion to it: token ids beyond the context, and text (or chat
content) longer than `ModelLimits.max_prompt_bytes`, are rejected before
any per-id work or tokenizing (a 63 MB prompt otherwise took 10 s and
1.2 GiB to refuse).

Both raise `RequestError(code, message)`; the servicer answers
`context.abort(err.code, err.message)`. Messages name the field and its
allowed range ("max_tokens must be 1..8192, got 0"). Only grpc's StatusCode
enum is used here: no channels, no servers.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from engine.chat_template import ChatMessage
from runtime.sampling import DEFAULT_MAX_TOKENS, InvalidRequest, Sampling, check_token_ids, sampling_from_proto
from runtime.sampling import check_prompt as sampling_check_prompt
from runtime.text import clip
from tandem.v1 import inference_pb2

MAX_REQUEST_ID_CHARS = 128
# Chat turns in one request; a longer history is better sent as a rendered prompt.
MAX_CHAT_MESSAGES = 1024
# A generous bound on the UTF-8 bytes one token of any vocabulary stands for. Text of N bytes
# has at least N / MAX_BYTES_PER_TOKEN tokens, so text longer than context x this bound cannot
# fit and is refused without tokenizing it. Real BPE vocabularies stay well below it (their
# longest tokens are runs of spaces or dashes of a few dozen bytes); a byte tokenizer has 1.
MAX_BYTES_PER_TOKEN = 128


class RequestError(Exception):
    """The request cannot be served as given: answer `code` with `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


@dataclass(frozen=True)
class ModelLimits:
    """What the router knows of a servable model (from its ModelSpec and tokenizer)."""

    name: str
    # Prompt plus output, in tokens.
    max_context_tokens: int
    max_output_tokens: int
    # max_tokens when the request leaves it unset (capped by max_output_tokens).
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    # 0: unknown (token ids are then not range-checked).
    vocab_size: int = 0

    @property
    def max_prompt_bytes(self) -> int:
        """Text (or total chat content) longer than this, in UTF-8 bytes, has more tokens than the context."""
        return self.max_context_tokens * MAX_BYTES_PER_TOKEN


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    model: ModelLimits
    # Exactly one of the three is set; check_prompt fills prompt_token_ids.
    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    messages: tuple[ChatMessage, ...] | None
    sampling: Sampling
    # False: max_tokens is the model's default and may be shortened to fit
    # the context; True: the client asked for it and gets an error instead.
    max_tokens_explicit: bool


def _new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(request_id: str) -> bool:
    """1..128 printable ASCII characters (space to tilde)."""
    # For ASCII text, isprintable() is exactly space to tilde.
    return 0 < len(request_id) <= MAX_REQUEST_ID_CHARS and request_id.isascii() and request_id.isprintable()


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _known(models: Mapping[str, ModelLimits]) -> str:
    return f"known: {', '.join(sorted(models))}" if models else "no models are configured"


def validate_generate(
    request: inference_pb2.GenerateRequest,
    models: Mapping[str, ModelLimits],
    *,
    new_request_id: Callable[[], str] = _new_request_id,
) -> ValidRequest:
    """Checks everything that does not need the tokenizer. Pure; may run concurrently.

    The request id is the client's when valid (1..128 printable ASCII),
    otherwise a new one from `new_request_id`.
    """
    if not request.model:
        raise _invalid(f"model is required ({_known(models)})")
    limits = models.get(request.model)
    if limits is None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model {clip(request.model)}; {_known(models)}")

    # Read once: each read of a string field copies it (30 ms for 30 MB).
    prompt = request.prompt
    has_text, has_ids, has_chat = bool(prompt), bool(request.prompt_token_ids), bool(request.messages)
    if has_text + has_ids + has_chat > 1:
        raise _invalid("set exactly one of prompt, prompt_token_ids and messages")
    if not (has_text or has_ids or has_chat):
        raise _invalid("prompt is empty")
    if len(request.messages) > MAX_CHAT_MESSAGES:
        raise _invalid(f"messages takes at most {MAX_CHAT_MESSAGES} turns, got {len(request.messages)}")
    _check_size(prompt, request, limits)
    token_ids = tuple(request.prompt_token_ids) if has_ids else None
    if token_ids is not None:
        try:
            check_token_ids("prompt_token_ids", token_ids, limits.vocab_size, limits.name)
        except InvalidRequest as exc:
            raise _invalid(str(exc)) from None

    params = request.sampling if request.HasField("sampling") else None
    try:
        sampling = sampling_from_proto(params, max_output_tokens=limits.max_output_tokens,
                                       default_max_tokens=limits.default_max_tokens, vocab_size=limits.vocab_size,
                                       model=limits.name)
    except InvalidRequest as exc:
        raise _invalid(str(exc)) from None
    explicit = params is not None and params.HasField("max_tokens")
    request_id = request.request_id if valid_request_id(request.request_id) else new_request_id()
    return ValidRequest(
        request_id=request_id,
        model=limits,
        prompt=prompt if has_text else None,
        prompt_token_ids=token_ids,
        messages=tuple(ChatMessage(m.role, m.content) for m in request.messages) if has_chat else None,
        sampling=sampling,
        max_tokens_explicit=explicit,
    )


def _check_size(prompt: str, request: inference_pb2.GenerateRequest, limits: ModelLimits) -> None:
    """INVALID_ARGUMENT for a prompt that cannot fit the context, before any per-id or per-token work."""
    context = limits.max_context_tokens
    if not context:
        return
    ids = len(request.prompt_token_ids)  # a repeated field knows its length
    if ids > context:
        raise _invalid(f"prompt_token_ids has {ids} ids; model {limits.name!r} takes at most {context} tokens")
    # A str of N characters is N..4N bytes of UTF-8: only text near the bound is encoded to count its bytes.
    if prompt:
        texts, what = [prompt], "prompt"
    else:
        texts, what = [m.content for m in request.messages], "messages' content"
    chars = sum(len(text) for text in texts)
    if chars * 4 <= limits.max_prompt_bytes:
        return
    if chars > limits.max_prompt_bytes:
        size = f"{chars} characters"
    else:
        nbytes = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        if nbytes <= limits.max_prompt_bytes:
            return
        size = f"{nbytes} bytes"
    raise _invalid(f"{what} is {size}; model {limits.name!r} takes at most {context} tokens, "
                   f"which is at most {limits.max_prompt_bytes} bytes of text ({MAX_BYTES_PER_TOKEN} bytes per token)")


def check_prompt(valid: ValidRequest, token_ids: Sequence[int]) -> ValidRequest:
    """The request with its prompt as ids, fitted to the model's context. Pure.

    The workers' prompt rule (runtime.sampling.check_prompt), plus one
    thing only the router does: an unset max_tokens shrinks to what the
    context leaves (at least 1). A client's explicit max_tokens that does
    not fit is an error, as is a prompt that fills the context on its own.
    """
    ids = tuple(token_ids)
    limits, sampling = valid.model, valid.sampling
    room = limits.max_context_tokens - len(ids)
    max_tokens = sampling.max_tokens
    if not valid.max_tokens_explicit and 1 <= room < max_tokens:
        max_tokens = room
    try:
        ids = sampling_check_prompt(ids, vocab_size=limits.vocab_size, max_context_tokens=limits.max_context_tokens,
                                    max_tokens=max_tokens, model=limits.name)
    except InvalidRequest as exc:
        raise _invalid(str(exc)) from None
    if max_tokens != sampling.max_tokens:
        sampling = dataclasses.replace(sampling, max_tokens=max_tokens)
    return dataclasses.replace(valid, prompt_token_ids=ids, sampling=sampling)
