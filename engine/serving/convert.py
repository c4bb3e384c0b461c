"""Conversions between tandem.v1 messages and engine values, shared by every service.

One place decides what a SamplingParams means (defaults, ranges), so the
router, prefill and decode workers can never disagree about a request.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.base import FinishReason, InvalidRequest, Sampling
from tandem.v1 import common_pb2

DEFAULT_MAX_TOKENS = 256

_FINISH_TO_PROTO = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_TOKEN: common_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: common_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.CONTEXT_FULL: common_pb2.FINISH_REASON_CONTEXT_FULL,
}


def sampling_from_proto(params: common_pb2.SamplingParams, *, max_output_tokens: int = 8192,
                        default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Sampling:
    """Validated Sampling; InvalidRequest names the field and its allowed range."""
    max_tokens = params.max_tokens if params.HasField("max_tokens") else min(default_max_tokens, max_output_tokens)
    return Sampling.create(
        max_output_tokens=max_output_tokens,
        max_tokens=max_tokens,
        temperature=params.temperature if params.HasField("temperature") else 0.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k if params.HasField("top_k") else 0,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )


def sampling_to_proto(sampling: Sampling) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
    )
    if sampling.seed is not None:
        params.seed = sampling.seed
    return params


def finish_reason_to_proto(reason: str | None) -> common_pb2.FinishReason.ValueType:
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_TO_PROTO[reason]


def check_prompt(prompt: Sequence[int], *, vocab_size: int, max_context_tokens: int,
                 max_tokens: int) -> tuple[int, ...]:
    """The prompt as a tuple, or InvalidRequest saying what is wrong with it."""
    if not prompt:
        raise InvalidRequest("prompt_token_ids is empty: send at least one token")
    bad = next((t for t in prompt if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt_token_ids has token id {bad}; this model's ids are 0..{vocab_size - 1}")
    if max_context_tokens and len(prompt) + max_tokens > max_context_tokens:
        raise InvalidRequest(
            f"prompt has {len(prompt)} tokens and max_tokens is {max_tokens}; the model takes at most "
            f"{max_context_tokens} tokens in all")
    return tuple(prompt)


def check_model(served: str, requested: str) -> None:
    """InvalidRequest unless `requested` is empty or the model this worker serves."""
    if requested and requested != served:
        raise InvalidRequest(f"this worker serves model {served!r}, not {requested!r}")
