"""Sampling and finish reasons: the value types every service shares, and their tandem.v1 forms.

One place decides what a SamplingParams means (defaults, ranges), so the
router, prefill and decode workers can never disagree about a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime.text import clip
from tandem.v1 import common_pb2


class InvalidRequest(ValueError):
    """The request cannot be served as given; the message names the field."""


class FinishReason:
    """Why a sequence ended (mirrors tandem.v1.FinishReason names)."""

    LENGTH = "length"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    CANCELLED = "cancelled"
    CONTEXT_FULL = "context_full"


# Far above any useful value (past ~2 sampling is noise), small enough that logits / T stays finite.
MAX_TEMPERATURE = 100.0
# Larger than any vocabulary served; a top_k at or above the vocabulary size means "all tokens".
MAX_TOP_K = 1 << 20


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings. Build with `Sampling.create(...)`, which checks ranges."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def create(cls, *, max_output_tokens: int = 8192, **values: Any) -> Sampling:
        """Checks every range; raises InvalidRequest naming the field and the allowed range."""
        sampling = cls(**values)
        if not 1 <= sampling.max_tokens <= max_output_tokens:
            raise InvalidRequest(f"max_tokens must be 1..{max_output_tokens}, got {sampling.max_tokens}")
        # `not <=` also catches NaN; +inf would turn every logit into NaN in the engine.
        if not 0.0 <= sampling.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(f"temperature must be 0..{MAX_TEMPERATURE:g}, got {sampling.temperature}")
        if not 0.0 < sampling.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {sampling.top_p}")
        if not 0 <= sampling.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be 0..{MAX_TOP_K} (0: off), got {sampling.top_k}")
        if any(not s for s in sampling.stop):
            raise InvalidRequest("stop strings must not be empty")
        return sampling


DEFAULT_MAX_TOKENS = 256

_FINISH_TO_PROTO = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_TOKEN: common_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: common_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.CONTEXT_FULL: common_pb2.FINISH_REASON_CONTEXT_FULL,
}


MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64


def _f32(value: float) -> float:
    # Proto floats are float32: show 0.9 as 0.9, not 0.8999999761581421.
    return float(f"{value:.7g}")


def sampling_from_proto(params: common_pb2.SamplingParams | None, *, max_output_tokens: int = 8192,
                        default_max_tokens: int = DEFAULT_MAX_TOKENS, vocab_size: int = 0,
                        model: str = "") -> Sampling:
    """Validated Sampling; InvalidRequest names the field and its allowed range.

    An unset max_tokens becomes min(default_max_tokens, max_output_tokens);
    `vocab_size` (0: unknown) range-checks stop_token_ids.
    """
    values: dict[str, Any] = {}
    explicit = params is not None and params.HasField("max_tokens")
    values["max_tokens"] = params.max_tokens if params is not None and explicit \
        else min(default_max_tokens, max_output_tokens)
    if params is not None:
        for name in ("temperature", "top_p"):
            if params.HasField(name):
                values[name] = _f32(getattr(params, name))
        if params.HasField("top_k"):
            values["top_k"] = params.top_k
        if params.HasField("seed"):
            values["seed"] = params.seed
        stops = tuple(params.stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for i, stop in enumerate(stops):
            if len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop[{i}] must be 1..{MAX_STOP_CHARS} characters, got {len(stop)}")
        stop_ids = tuple(params.stop_token_ids)
        if len(stop_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(stop_ids)}")
        check_token_ids("stop_token_ids", stop_ids, vocab_size, model)
        values.update(stop=stops, stop_token_ids=stop_ids, ignore_eos=params.ignore_eos)
    return Sampling.create(max_output_tokens=max_output_tokens, **values)


def check_token_ids(field: str, ids: Sequence[int], vocab_size: int, model: str = "") -> None:
    """InvalidRequest naming the first id outside 0..vocab_size-1 (no check when vocab_size is 0)."""
    if not vocab_size:
        return
    whose = f"model {model!r} has" if model else "this model has"
    for i, token_id in enumerate(ids):
        if token_id >= vocab_size:
            raise InvalidRequest(f"{field}[{i}] is {token_id}; {whose} token ids 0..{vocab_size - 1}")


def sampling_to_proto(sampling: Sampling) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, stop=list(sampling.stop), stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
    )
    if sampling.seed is not None:
        params.seed = sampling.seed
    return params


_FINISH_FROM_PROTO = {value: reason for reason, value in _FINISH_TO_PROTO.items()}


def finish_reason_to_proto(reason: str | None) -> common_pb2.FinishReason.ValueType:
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_TO_PROTO[reason]


def finish_reason_from_proto(value: common_pb2.FinishReason.ValueType) -> str:
    """The FinishReason a worker reported; an unset or unknown value reads as LENGTH (the sequence ended)."""
    return _FINISH_FROM_PROTO.get(value, FinishReason.LENGTH)


def check_prompt(prompt: Sequence[int], *, vocab_size: int, max_context_tokens: int, max_tokens: int,
                 model: str = "") -> tuple[int, ...]:
    """The prompt as a tuple, or InvalidRequest saying what is wrong with it.

    The one prompt rule of the router and the workers: at least one token,
    every id below `vocab_size` (0: unknown, unchecked), and prompt plus
    `max_tokens` within `max_context_tokens` (0: no limit). `model` names the
    model in messages.
    """
    ids = tuple(prompt)
    if not ids:
        raise InvalidRequest("prompt is empty (it has no tokens)")
    check_token_ids("prompt_token_ids", ids, vocab_size, model)
    if max_context_tokens and len(ids) + max_tokens > max_context_tokens:
        whose = f"model {model!r}" if model else "the model"
        raise InvalidRequest(
            f"prompt has {len(ids)} tokens and max_tokens is {max_tokens}; {whose} takes at most "
            f"{max_context_tokens} tokens (including max_tokens)")
    return ids


def check_model(served: str, requested: str) -> None:
    """InvalidRequest unless `requested` is empty or the model this worker serves."""
    if requested and requested != served:
        raise InvalidRequest(f"this worker serves model {served!r}, not {clip(requested)}")
