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

import itertools
import random
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from types import TracebackType
from typing import TypeVar, Unpack

import grpc

from router_svc.client_aio import AsyncTandemClient
from router_svc.client_errors import TandemError, error_from_rpc
from router_svc.client_types import (
    Chunk,
    Completion,
    Deadline,
    Metadata,
    ModelInfo,
    PemSource,
    RetryPolicy,
    SamplingArgs,
    build_request,
    chunk_from_pb,
    client_channels,
    completion_from_pb,
    models_from_pb,
)
from tandem.v1 import inference_pb2, inference_pb2_grpc

__all__ = ["AsyncTandemClient", "Chunk", "Completion", "GenerateStream", "ModelInfo", "RetryPolicy", "TandemClient",
           "TandemError"]

T = TypeVar("T")


class TandemClient:
    """Sync client of the Inference API on one or more routers. Close it (or use `with`)."""

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
        self.targets, self._channels = client_channels(
            targets, tls=tls, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, options=options,
            make=lambda t, creds, opts: grpc.secure_channel(t, creds, options=opts) if creds
            else grpc.insecure_channel(t, options=opts))
        self._stubs = [inference_pb2_grpc.InferenceStub(ch) for ch in self._channels]
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._turn = itertools.count()
        self._retry_wait = threading.Event()  # never set: an interruptible sleep

    # -- calls -------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        model: str,
        token_ids: Sequence[int] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
        **sampling: Unpack[SamplingArgs],
    ) -> GenerateStream:
        """Streams the completion of `prompt` (or `token_ids`) as Chunks. Iterate it once."""
        request = build_request(model=model, prompt=prompt, token_ids=token_ids, request_id=request_id,
                                sampling=sampling)
        return GenerateStream(self, request, Deadline(timeout if timeout is not None else self.timeout),
                              (*self.metadata, *metadata))

    def complete(
        self,
        prompt: str | None = None,
        *,
        model: str,
        token_ids: Sequence[int] | None = None,
        request_id: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
        **sampling: Unpack[SamplingArgs],
    ) -> Completion:
        """The whole completion in one answer."""
        request = build_request(model=model, prompt=prompt, token_ids=token_ids, request_id=request_id,
                                sampling=sampling)
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        md = (*self.metadata, *metadata)
        response = self._unary(
            lambda stub, t: stub.Complete(request, timeout=t, metadata=md), deadline, request.request_id
        )
        return completion_from_pb(response)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Models the router serves now, with their limits and routable worker counts."""
        deadline = Deadline(timeout if timeout is not None else self.timeout)
        response = self._unary(
            lambda stub, t: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=t, metadata=self.metadata),
            deadline,
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

    def _stubs_in_turn(self) -> Iterator[inference_pb2_grpc.InferenceStub]:
        """Stubs for the attempts of one call: the next target first, then the others in turn."""
        start = next(self._turn)
        for attempt in itertools.count():
            yield self._stubs[(start + attempt) % len(self._stubs)]

    def _unary(
        self,
        call: Callable[[inference_pb2_grpc.InferenceStub, float | None], T],
        deadline: Deadline,
        request_id: str,
    ) -> T:
        for attempt, stub in enumerate(self._stubs_in_turn(), start=1):
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                raise deadline.expired_error(request_id, attempt - 1)
            try:
                return call(stub, remaining)
            except grpc.RpcError as exc:
                err = error_from_rpc(exc, request_id=request_id, attempts=attempt)
                delay = self.retry.delay_s(err, attempt, received=False, rng=self._rng)
                if delay is None or not deadline.allows(delay):
                    raise err from None
                self._retry_wait.wait(delay)
        raise AssertionError("unreachable")


class GenerateStream:
    """An iterator of Chunks for one Generate call, with its retries. Iterate once.

    `cancel()` (from any thread), `close()`, or leaving a `with` block ends
    the stream and cancels the server-side call; iteration then just stops.
    """

    def __init__(
        self, client: TandemClient, request: inference_pb2.GenerateRequest, deadline: Deadline, metadata: Metadata
    ) -> None:
        self.request_id = request.request_id
        # Calls made so far (1 + retries).
        self.attempts = 0
        self._client = client
        self._request = request
        self._deadline = deadline
        self._metadata = tuple(metadata)
        self._call: grpc.Call | None = None
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
        client, deadline = self._client, self._deadline
        for stub in client._stubs_in_turn():
            self.attempts += 1
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                raise deadline.expired_error(self.request_id, self.attempts - 1)
            call = stub.Generate(self._request, timeout=remaining, metadata=self._metadata)
            self._call = call
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
                err = error_from_rpc(exc, request_id=self.request_id, attempts=self.attempts)
                delay = client.retry.delay_s(err, self.attempts, received, client._rng)
                if delay is None or not deadline.allows(delay):
                    raise err from None
            finally:
                # Leaving early (close, break and garbage collection, an
                # exception in the consumer) must free the server's sequence;
                # on a finished call this does nothing.
                call.cancel()
            if self._cancelled.wait(delay):
                return
