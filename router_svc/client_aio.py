"""Tandem's asyncio client (grpc.aio): the twin of `router_svc.client.TandemClient`.

    async with AsyncTandemClient("router-1:50051") as client:
        async with client.generate("Hello", model="llama-3-8b") as stream:
            async for chunk in stream:
                print(chunk.text, end="")

Same guarantees as the sync client: one deadline over all attempts, retries
only before anything is received, leaving a stream early (its `async with`
block, `aclose()`, `cancel()`, or the consuming task being cancelled)
cancels the server-side call. Use a client from the event loop that made it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import TypeVar, Unpack

import grpc
import grpc.aio

from router_svc.client_errors import error_from_rpc
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

T = TypeVar("T")


class AsyncTandemClient:
    """Asyncio client of the Inference API on one or more routers. Close it (or use `async with`)."""

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
        """Arguments as for `TandemClient`."""
        self.targets, self._channels = client_channels(
            targets, tls=tls, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key, options=options,
            make=lambda t, creds, opts: grpc.aio.secure_channel(t, creds, options=opts) if creds
            else grpc.aio.insecure_channel(t, options=opts))
        self._stubs = [inference_pb2_grpc.InferenceStub(ch) for ch in self._channels]
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._turn = itertools.count()

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
    ) -> AsyncGenerateStream:
        """Streams the completion as Chunks (`async for`). Iterate it once."""
        request = build_request(model=model, prompt=prompt, token_ids=token_ids, request_id=request_id,
                                sampling=sampling)
        return AsyncGenerateStream(self, request, Deadline(timeout if timeout is not None else self.timeout),
                                   (*self.metadata, *metadata))

    async def complete(
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
        md = (*self.metadata, *metadata)
        response = await self._unary(
            lambda stub, t: stub.Complete(request, timeout=t, metadata=md),
            Deadline(timeout if timeout is not None else self.timeout),
            request.request_id,
        )
        return completion_from_pb(response)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Models the router serves now, with their limits and routable worker counts."""
        response = await self._unary(
            lambda stub, t: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=t, metadata=self.metadata),
            Deadline(timeout if timeout is not None else self.timeout),
            "",
        )
        return models_from_pb(response)

    async def close(self) -> None:
        """Closes the channels; calls in flight fail with CANCELLED. Safe to call twice."""
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _stubs_in_turn(self) -> Iterator[inference_pb2_grpc.InferenceStub]:
        start = next(self._turn)
        for attempt in itertools.count():
            yield self._stubs[(start + attempt) % len(self._stubs)]

    async def _unary(
        self,
        call: Callable[[inference_pb2_grpc.InferenceStub, float | None], Awaitable[T]],
        deadline: Deadline,
        request_id: str,
    ) -> T:
        for attempt, stub in enumerate(self._stubs_in_turn(), start=1):
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                raise deadline.expired_error(request_id, attempt - 1)
            try:
                return await call(stub, remaining)
            except grpc.RpcError as exc:
                err = error_from_rpc(exc, request_id=request_id, attempts=attempt)
                delay = self.retry.delay_s(err, attempt, received=False, rng=self._rng)
                if delay is None or not deadline.allows(delay):
                    raise err from None
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


class AsyncGenerateStream:
    """An async iterator of Chunks for one Generate call, with its retries. Iterate once.

    `cancel()`, `aclose()`, leaving an `async with` block, or cancelling the
    consuming task ends the stream and cancels the server-side call.
    """

    def __init__(
        self,
        client: AsyncTandemClient,
        request: inference_pb2.GenerateRequest,
        deadline: Deadline,
        metadata: Metadata,
    ) -> None:
        self.request_id = request.request_id
        self.attempts = 0
        self._client = client
        self._request = request
        self._deadline = deadline
        self._metadata = tuple(metadata)
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._cancelled = False
        self._chunks = self._run()

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Chunk:
        return await self._chunks.__anext__()

    def cancel(self) -> None:
        """Stops the stream and cancels the call on the server. Safe to call twice."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        """Cancel and release the iterator. Safe to call twice."""
        self.cancel()
        await self._chunks.aclose()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def text(self) -> str:
        """Iterates what is left and returns its text joined."""
        return "".join([chunk.text async for chunk in self])

    async def _run(self) -> AsyncGenerator[Chunk, None]:
        client, deadline = self._client, self._deadline
        for stub in client._stubs_in_turn():
            if self._cancelled:
                return
            self.attempts += 1
            remaining = deadline.remaining()
            if remaining is not None and remaining <= 0:
                raise deadline.expired_error(self.request_id, self.attempts - 1)
            call = stub.Generate(self._request, timeout=remaining, metadata=self._metadata)
            self._call = call
            received = False
            try:
                async for response in call:
                    received = True
                    yield chunk_from_pb(response)
                return
            except asyncio.CancelledError:
                # Our own cancel() surfaces here as CancelledError: end quietly.
                # A cancelled consuming task must still see its cancellation.
                if self._cancelled and not _current_task_cancelling():
                    return
                raise
            except grpc.RpcError as exc:
                if self._cancelled:
                    return
                err = error_from_rpc(exc, request_id=self.request_id, attempts=self.attempts)
                delay = client.retry.delay_s(err, self.attempts, received, client._rng)
                if delay is None or not deadline.allows(delay):
                    raise err from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
