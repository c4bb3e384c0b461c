"""The public Inference service over gRPC: GenerateRequest in, GenerateResponses out.

Thin: the request handling (validation, tokenizing, routing through the
pipeline, detokenizing) is router_svc.inference's, shared with the
OpenAI-compatible HTTP front; this module only turns its errors into gRPC
statuses (with the retry hint as trailing metadata) and the client's
deadline into the job's.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from router_svc.client_errors import retry_hint_metadata
from router_svc.inference import InferenceCore
from router_svc.pipeline import RouteFailure
from router_svc.validation import RequestError
from runtime.text import cap
from tandem.v1 import inference_pb2, inference_pb2_grpc


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def _abort(self, context: grpc.aio.ServicerContext, exc: RequestError | RouteFailure) -> None:
        if isinstance(exc, RouteFailure) and exc.retry_after_s:
            context.set_trailing_metadata(retry_hint_metadata(exc.retry_after_s))
        await context.abort(exc.code, cap(exc.message))

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateResponse]:
        steps = self.core.generate(request, deadline=_deadline(context))
        try:
            async with contextlib.aclosing(steps):
                async for response in steps:
                    yield response
        except (RequestError, RouteFailure) as exc:
            await self._abort(context, exc)

    async def Complete(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.CompleteResponse:
        try:
            return await self.core.complete(request, deadline=_deadline(context))
        except (RequestError, RouteFailure) as exc:
            await self._abort(context, exc)
            raise AssertionError("unreachable: abort raises") from None

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        return self.core.list_models()
