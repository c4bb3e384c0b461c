"""Tandem's client library for gRPC users (sync). `AsyncTandemClient` is the asyncio twin.

    with TandemClient("router-1:50051") as client:
        for chunk in client.generate("Hello", model="llama-3-8b", max_tokens=64):
            print(chunk.text, end="", flush=True)

Guarantees:
- One deadline (`timeout`) covers a call and all its retries; the router
  sees the remaining time on every attempt.
- A call is retried (on the next target, with backoff) only while nothing
  has been received from it: see `RetryPolicy`. Tokens are never repeated.
- Leaving a stream early (`stream.cancel()`, closing it, or leaving its
  `with` block) cancels the server-side call, which frees the sequence.
- Errors are `TandemError(code, message)`.

A client may be shared by threads; a stream belongs to the thread iterating it
(`cancel()` may come from any thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc

from router_svc.client_aio import AsyncTandemClient
from router_svc.client_errors import TandemError
from router_svc.client_types import (
    Chunk,
    ClientCore,
    Completion,
    Deadline,
    Metadata,
    ModelInfo,
    RetryPolicy,
    SamplingArgs,
    StreamCore,
    chunk_from_pb,
    completion_from_pb,
    models_from_pb,
)
from tandem.v1 import inference_pb2, inference_pb2_grpc

__all__ = ["AsyncTandemClient", "Chunk", "Completion", "GenerateStream", "ModelInfo", "RetryPolicy", "TandemClient",
           "TandemError"]

T = TypeVar("T")

# Never set: an interruptible sleep between attempts.
_retry_wait = threading.Event().wait


class TandemClient(ClientCore):
    """Sync client of the Inference API on one or more routers. Close it (or use `with`).

    Constructor arguments: see `ClientCore` (targets, tls, certificates,
    timeout, metadata, retry, options, rng).
    """

    @staticmethod
    def _make_channel(target: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        if creds:
            return grpc.secure_channel(target, creds, options=options)
        return grpc.insecure_channel(target, options=options)

    # -- calls -------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        model: str,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
        **sampling: Unpack[SamplingArgs],
    ) -> GenerateStream:
        """Streams the completion of `prompt` (or `token_ids`, or chat `messages`) as Chunks. Iterate it once."""
        return GenerateStream(self, *self._generate_args(prompt, model, token_ids, request_id, timeout, metadata,
                                                          sampling, messages))

    def complete(
        self,
        prompt: str | None = None,
        *,
        model: str,
        token_ids: Sequence[int] | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
        **sampling: Unpack[SamplingArgs],
    ) -> Completion:
        """The whole completion in one answer."""
        request, deadline, md = self._generate_args(prompt, model, token_ids, request_id, timeout, metadata, sampling,
                                                     messages)
        response = self._unary(
            lambda stub, t: stub.Complete(request, timeout=t, metadata=md), deadline, request.request_id
        )
        return completion_from_pb(response)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Models the router serves now, with their limits and routable worker counts."""
        response = self._unary(
            lambda stub, t: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=t, metadata=self.metadata),
            self._deadline(timeout),
            "",
        )
        return models_from_pb(response)

    def close(self) -> None:
        """Closes the channels; calls in flight fail with CANCELLED. Safe to call twice."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _unary(
        self,
        call: Callable[[inference_pb2_grpc.InferenceStub, float | None], T],
        deadline: Deadline,
        request_id: str,
    ) -> T:
        for attempt, stub in enumerate(self._stubs_in_turn(), start=1):
            remaining = deadline.left_for(request_id, attempt - 1)
            try:
                return call(stub, remaining)
            except grpc.RpcError as exc:
                delay = self._retry_delay(exc, deadline, request_id, attempt, received=False)
            _retry_wait(delay)
        raise AssertionError("unreachable")


class GenerateStream(StreamCore):
    """An iterator of Chunks for one Generate call, with its retries. Iterate once.

    `cancel()` (from any thread), `close()`, or leaving a `with` block ends
    the stream and cancels the server-side call; iteration then just stops.
    """

    def __init__(
        self, client: TandemClient, request: inference_pb2.GenerateRequest, deadline: Deadline, metadata: Metadata
    ) -> None:
        super().__init__(client, request, deadline, metadata)
        self._cancelled = threading.Event()
        self._chunks = self._run()

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def cancel(self) -> None:
        """Stops the stream and cancels the call on the server. Safe to call twice, from any thread."""
        self._cancelled.set()
        call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        """Cancel, from the iterating thread, and release the iterator."""
        self.cancel()
        self._chunks.close()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def text(self) -> str:
        """Iterates what is left and returns its text joined."""
        return "".join(chunk.text for chunk in self)

    def _run(self) -> Generator[Chunk, None, None]:
        for stub in self._client._stubs_in_turn():
            call = self._start_attempt(stub)
            if self._cancelled.is_set():
                call.cancel()
            received = False
            try:
                for response in call:
                    received = True
                    yield chunk_from_pb(response)
                return
            except grpc.RpcError as exc:
                if self._cancelled.is_set():
                    return
                delay = self._retry_delay(exc, received)
            finally:
                # Leaving early (close, break and garbage collection, an
                # exception in the consumer) must free the server's sequence;
                # on a finished call this does nothing.
                call.cancel()
            if self._cancelled.wait(delay):
                return
