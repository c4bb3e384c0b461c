"""Plain values of the client library, the retry rule, and the proto <-> value conversions.

Shared by the sync (`router_svc.client`) and async (`router_svc.client_aio`)
clients; no I/O here.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import grpc

from router_svc.client_errors import TandemError
from tandem.v1 import common_pb2, inference_pb2

_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP_TOKEN: "stop_token",
    common_pb2.FINISH_REASON_STOP_STRING: "stop_string",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_CONTEXT_FULL: "context_full",
}

# Long prompts and completions travel in one message.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
)

Metadata = Sequence[tuple[str, str]]
PemSource = bytes | str | Path


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Where the time went, in milliseconds (see tandem.v1.Timings)."""

    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    ttft_ms: float = 0.0
    mean_inter_token_ms: float = 0.0
    e2e_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass(frozen=True)
class Route:
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    local_prefill: bool = False
    reason: str = ""
    migrations: int = 0
    retries: int = 0


@dataclass(frozen=True)
class Chunk:
    """One streamed response: new text and ids; the last also has finish_reason, usage and timings."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    # "length", "stop_token", "stop_string", "cancelled", "context_full"; None before the end.
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    route: Route | None = None


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None
    timings: Timings | None
    route: Route | None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_context_tokens: int
    max_output_tokens: int
    prefill_workers: int
    decode_workers: int


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is made again. The defaults retry only what is always safe.

    A call is retried only while no response has arrived: UNAVAILABLE (the
    router is down or has no worker now), and RESOURCE_EXHAUSTED when
    `retry_resource_exhausted` (waiting for the server's hint). Once a token
    has arrived, a failure is the caller's: the router itself moves a
    sequence to another worker mid-stream, so a failure that reaches the
    client after the first token is real. Each retry goes to the next target.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retry_resource_exhausted: bool = False
    # Longest wait for a RESOURCE_EXHAUSTED hint; longer hints are surfaced.
    max_retry_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Jittered exponential backoff after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        # Half fixed, half random: spreads a herd of clients without ever waiting ~0.
        return ceiling * (0.5 + 0.5 * rng.random())

    def delay_s(self, err: TandemError, attempt: int, received: bool, rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt, or None: surface `err`."""
        if received or attempt >= self.max_attempts:
            return None
        if err.code is grpc.StatusCode.UNAVAILABLE:
            return self.backoff_s(attempt, rng)
        if err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_resource_exhausted:
            hint = err.retry_after_s
            if hint is None:
                return self.backoff_s(attempt, rng)
            return hint if hint <= self.max_retry_after_s else None
        return None


NO_RETRY = RetryPolicy(max_attempts=1)


class Deadline:
    """A whole call's time limit across its attempts; None: no limit."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def expired_error(self, request_id: str, attempts: int) -> TandemError:
        return TandemError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"deadline of {self.timeout_s:g}s passed",
            request_id=request_id,
            attempts=attempts,
        )

    def allows(self, delay_s: float) -> bool:
        remaining = self.remaining()
        return remaining is None or delay_s < remaining


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def channel_credentials(
    *,
    tls: bool | None,
    root_certificates: PemSource | None,
    certificate_chain: PemSource | None,
    private_key: PemSource | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext. `tls=None`: TLS when any certificate is given.

    Certificates may be PEM bytes or paths. Without `root_certificates`, the
    system's roots verify the server. A client certificate needs its key.
    """
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS needs both)")
    if tls is None:
        tls = any(x is not None for x in (root_certificates, certificate_chain, private_key))
    if not tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates),
        private_key=_pem(private_key),
        certificate_chain=_pem(certificate_chain),
    )


class SamplingArgs(TypedDict, total=False):
    """Sampling keywords of generate() and complete(); unset ones take the router's defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool


def build_request(
    *,
    model: str,
    prompt: str | None,
    token_ids: Sequence[int] | None,
    request_id: str,
    sampling: SamplingArgs,
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; a new request id when none is given, so retries share one id."""
    if (prompt is None) == (token_ids is None):
        raise ValueError("pass exactly one of prompt and token_ids")
    unknown = set(sampling) - set(SamplingArgs.__annotations__)
    if unknown:
        raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
    stop = sampling.get("stop", ())
    if isinstance(stop, str):
        raise TypeError("stop takes a list of strings, not a string")
    params = common_pb2.SamplingParams(
        stop=list(stop),
        stop_token_ids=list(sampling.get("stop_token_ids", ())),
        ignore_eos=sampling.get("ignore_eos", False),
    )
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = sampling.get(name)
        if value is not None:
            setattr(params, name, value)
    request = inference_pb2.GenerateRequest(
        request_id=request_id or uuid.uuid4().hex, model=model, sampling=params
    )
    if prompt is not None:
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(token_ids or ())
    return request


def _usage(msg: common_pb2.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.cached_prompt_tokens)


def _timings(msg: common_pb2.Timings) -> Timings:
    return Timings(msg.queue_ms, msg.prefill_ms, msg.kv_transfer_ms, msg.ttft_ms, msg.mean_inter_token_ms,
                   msg.e2e_ms, msg.decode_ms)


def _route(msg: inference_pb2.RouteInfo) -> Route:
    return Route(msg.prefill_worker_id, msg.decode_worker_id, msg.local_prefill, msg.reason, msg.migrations,
                 msg.retries)


def _answer_fields(msg: inference_pb2.GenerateResponse | inference_pb2.CompleteResponse) -> dict[str, Any]:
    """The fields GenerateResponse and CompleteResponse share, as Chunk / Completion arguments."""
    return {
        "request_id": msg.request_id,
        "text": msg.text,
        "token_ids": tuple(msg.token_ids),
        "finish_reason": _FINISH.get(msg.finish_reason),
        "usage": _usage(msg.usage) if msg.HasField("usage") else None,
        "timings": _timings(msg.timings) if msg.HasField("timings") else None,
        "route": _route(msg.route) if msg.HasField("route") else None,
    }


def chunk_from_pb(msg: inference_pb2.GenerateResponse) -> Chunk:
    return Chunk(**_answer_fields(msg))


def completion_from_pb(msg: inference_pb2.CompleteResponse) -> Completion:
    return Completion(**_answer_fields(msg))


def client_channels(targets: str | Sequence[str], *, tls: bool | None, root_certificates: PemSource | None,
                    certificate_chain: PemSource | None, private_key: PemSource | None,
                    options: Sequence[tuple[str, str | int]],
                    make: Callable[[str, grpc.ChannelCredentials | None, list[tuple[str, Any]]], Any],
                    ) -> tuple[list[str], list[Any]]:
    """(targets, channels) for the sync and async clients; `make(target, credentials or None, options)`."""
    target_list = [targets] if isinstance(targets, str) else list(targets)
    if not target_list:
        raise ValueError("at least one target (host:port) is required")
    creds = channel_credentials(
        tls=tls, root_certificates=root_certificates, certificate_chain=certificate_chain, private_key=private_key
    )
    opts = [*CHANNEL_OPTIONS, *options]
    return target_list, [make(t, creds, opts) for t in target_list]


def models_from_pb(msg: inference_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(m.name, m.max_context_tokens, m.max_output_tokens, m.prefill_workers, m.decode_workers)
        for m in msg.models
    ]
