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
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio

from router_svc.client_types import (
    Chunk,
    ClientCore,
    Completion,
    Deadline,
    Metadata,
    ModelInfo,
    SamplingArgs,
    StreamCore,
    chunk_from_pb,
    completion_from_pb,
    models_from_pb,
)
from tandem.v1 import inference_pb2, inference_pb2_grpc

T = TypeVar("T")


class AsyncTandemClient(ClientCore):
    """Asyncio client of the Inference API on one or more routers. Close it (or use `async with`).

    Constructor arguments as for `TandemClient` (see `ClientCore`).
    """

    @staticmethod
    def _make_channel(target: str, creds: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]) -> Any:
        if creds:
            return grpc.aio.secure_channel(target, creds, options=options)
        return grpc.aio.insecure_channel(target, options=options)

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
    ) -> AsyncGenerateStream:
        """Streams the completion as Chunks (`async for`). Iterate it once."""
        return AsyncGenerateStream(self, *self._generate_args(prompt, model, token_ids, request_id, timeout,
                                                               metadata, sampling, messages))

    async def complete(
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
        response = await self._unary(
            lambda stub, t: stub.Complete(request, timeout=t, metadata=md), deadline, request.request_id
        )
        return completion_from_pb(response)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Models the router serves now, with their limits and routable worker counts."""
        response = await self._unary(
            lambda stub, t: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=t, metadata=self.metadata),
            self._deadline(timeout),
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

    async def _unary(
        self,
        call: Callable[[inference_pb2_grpc.InferenceStub, float | None], Awaitable[T]],
        deadline: Deadline,
        request_id: str,
    ) -> T:
        for attempt, stub in enumerate(self._stubs_in_turn(), start=1):
            remaining = deadline.left_for(request_id, attempt - 1)
            try:
                return await call(stub, remaining)
            except grpc.RpcError as exc:
                delay = self._retry_delay(exc, deadline, request_id, attempt, received=False)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")


class AsyncGenerateStream(StreamCore):
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
        super().__init__(client, request, deadline, metadata)
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
        for stub in self._client._stubs_in_turn():
            if self._cancelled:
                return
            call = self._start_attempt(stub)
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
                delay = self._retry_delay(exc, received)
            finally:
                call.cancel()
            await asyncio.sleep(delay)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
