"""Everything the sync (`router_svc.client`) and async (`router_svc.client_aio`) clients share.

Plain values, the retry rule, the proto <-> value conversions, and
`ClientCore` / `StreamCore`: the clients' configuration, request building,
target rotation and retry decision. The two clients add only what differs,
how they wait and how they iterate. No I/O here (channels connect lazily).
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import grpc

from router_svc.client_errors import TandemError, error_from_rpc
from runtime.sampling import finish_reason_from_proto
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

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
    # A runtime.sampling.FinishReason: "length", "stop_token", "stop_string", "cancelled",
    # "context_full"; None before the end.
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
    # The model has a chat template: generate(messages=...) works.
    chat: bool = False


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


class Deadline:
    """A whole call's time limit across its attempts; None: no limit."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self._at is None else self._at - time.monotonic()

    def left_for(self, request_id: str, attempts: int) -> float | None:
        """The next attempt's timeout; DEADLINE_EXCEEDED (after `attempts` calls) when none is left."""
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise TandemError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {self.timeout_s:g}s passed",
                              request_id=request_id, attempts=attempts)
        return remaining

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
    messages: Sequence[Mapping[str, str]] | None = None,
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; a new request id when none is given, so retries share one id.

    `messages` are chat turns as {"role": ..., "content": ...} (the OpenAI shape).
    """
    if sum(given is not None for given in (prompt, token_ids, messages)) != 1:
        raise ValueError("pass exactly one of prompt, token_ids and messages")
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
    elif messages is not None:
        for message in messages:
            request.messages.add(role=message["role"], content=message["content"])
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
        # UNSPECIFIED: not the last response yet.
        "finish_reason": finish_reason_from_proto(msg.finish_reason) if msg.finish_reason else None,
        "usage": _usage(msg.usage) if msg.HasField("usage") else None,
        "timings": _timings(msg.timings) if msg.HasField("timings") else None,
        "route": _route(msg.route) if msg.HasField("route") else None,
    }


def chunk_from_pb(msg: inference_pb2.GenerateResponse) -> Chunk:
    return Chunk(**_answer_fields(msg))


def completion_from_pb(msg: inference_pb2.CompleteResponse) -> Completion:
    return Completion(**_answer_fields(msg))


def models_from_pb(msg: inference_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(m.name, m.max_context_tokens, m.max_output_tokens, m.prefill_workers, m.decode_workers, m.chat)
        for m in msg.models
    ]


MakeChannel = Callable[[str, grpc.ChannelCredentials | None, list[tuple[str, Any]]], Any]


class ClientCore:
    """The state and decisions of a client, sync or async; the subclass makes channels and waits."""

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        tls: bool | None = None,
        root_certificates: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        private_key: PemSource | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, str | int]] = (),
        rng: random.Random | None = None,
    ) -> None:
        """`targets`: router host:port, or several (attempts rotate through them).

        `tls`: None means TLS exactly when a certificate is given; certificates
        are PEM bytes or file paths. `timeout`: default seconds per call (None:
        no deadline). `metadata`: sent with every call.
        """
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ValueError("at least one target (host:port) is required")
        creds = channel_credentials(
            tls=tls, root_certificates=root_certificates, certificate_chain=certificate_chain, private_key=private_key
        )
        opts = [*CHANNEL_OPTIONS, *options]
        self._channels = [self._make_channel(t, creds, opts) for t in self.targets]
        self._stubs = [inference_pb2_grpc.InferenceStub(ch) for ch in self._channels]
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._turn = itertools.count()

    # grpc.secure_channel / insecure_channel, or their grpc.aio twins.
    _make_channel: MakeChannel

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(timeout if timeout is not None else self.timeout)

    def _generate_args(
        self,
        prompt: str | None,
        model: str,
        token_ids: Sequence[int] | None,
        request_id: str,
        timeout: float | None,
        metadata: Metadata,
        sampling: SamplingArgs,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> tuple[inference_pb2.GenerateRequest, Deadline, Metadata]:
        """(request, deadline, metadata) of one generate() or complete() call."""
        request = build_request(model=model, prompt=prompt, token_ids=token_ids, request_id=request_id,
                                sampling=sampling, messages=messages)
        return request, self._deadline(timeout), (*self.metadata, *metadata)

    def _stubs_in_turn(self) -> Iterator[inference_pb2_grpc.InferenceStub]:
        """Stubs for the attempts of one call: the next target first, then the others in turn."""
        start = next(self._turn)
        for attempt in itertools.count():
            yield self._stubs[(start + attempt) % len(self._stubs)]

    def _retry_delay(self, exc: grpc.RpcError, deadline: Deadline, request_id: str, attempts: int,
                     received: bool) -> float:
        """Seconds to wait before the next attempt; raises the call's TandemError when there is none.

        Call it from the `except` block of the failed attempt.
        """
        err = error_from_rpc(exc, request_id=request_id, attempts=attempts)
        delay = self.retry.delay_s(err, attempts, received, self._rng)
        if delay is None or not deadline.allows(delay):
            raise err from None
        return delay


class StreamCore:
    """The state of one Generate call across its attempts, sync or async."""

    def __init__(self, client: ClientCore, request: inference_pb2.GenerateRequest, deadline: Deadline,
                 metadata: Metadata) -> None:
        self.request_id = request.request_id
        # Calls made so far (1 + retries).
        self.attempts = 0
        self._client = client
        self._request = request
        self._deadline = deadline
        self._metadata = tuple(metadata)
        self._call: Any = None

    def _start_attempt(self, stub: inference_pb2_grpc.InferenceStub) -> Any:
        """The next attempt's call; DEADLINE_EXCEEDED when no time is left for it."""
        self.attempts += 1
        remaining = self._deadline.left_for(self.request_id, self.attempts - 1)
        self._call = stub.Generate(self._request, timeout=remaining, metadata=self._metadata)
        return self._call

    def _retry_delay(self, exc: grpc.RpcError, received: bool) -> float:
        """As ClientCore._retry_delay, for this stream's latest attempt."""
        return self._client._retry_delay(exc, self._deadline, self.request_id, self.attempts, received)
