"""The public Inference service: validate, tokenize, run the pipeline, stream text back.

Thin: validation is router_svc.validation, routing router_svc.policy via
router_svc.pipeline, text engine.detokenizer. Every response
carries the request id; the last one carries finish reason, usage, timings
and the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from engine.base import Tokenizer
from engine.chat_template import ChatMessage
from engine.detokenizer import Detokenizer
from registry.keys import Kind
from router_svc.client_errors import retry_hint_metadata
from router_svc.live_view import LiveView
from router_svc.metrics import RouterMetrics
from router_svc.models import ModelCatalog, TokenizerUnavailable
from router_svc.pipeline import Job, Outcome, Pipeline, RouteFailure
from router_svc.validation import RequestError, ValidRequest, check_prompt, validate_generate
from runtime.logs import request_scope
from runtime.sampling import FinishReason, InvalidRequest, finish_reason_to_proto
from runtime.text import cap
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2

log = logging.getLogger(__name__)

# Prompts longer than this (characters of text or chat content) are tokenized on a worker thread,
# so one client's long prompt does not stall every other stream on the event loop. Shorter ones
# are cheaper to encode inline than to hand over.
INLINE_TOKENIZE_CHARS = 16 * 1024


def render_chat(model: str, tokenizer: Tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """Prompt ids of a chat, through the model's own template; RequestError when it cannot be rendered."""
    template = tokenizer.chat_template
    if template is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"model {model!r} has no chat template (its checkpoint's tokenizer config names none); "
                           f"send prompt instead of messages")
    try:
        return tokenizer.encode_rendered_chat(template.render(messages))
    except InvalidRequest as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


async def _prompt_ids(valid: ValidRequest, tokenizer: Tokenizer) -> Sequence[int]:
    """The prompt as token ids; a long one is tokenized off the event loop (the tokenizers release the GIL).

    validate_generate has already refused text too long for the context, so
    the work here is bounded by the context size.
    """
    if valid.prompt_token_ids is not None:
        return valid.prompt_token_ids
    if valid.messages is not None:
        messages = valid.messages
        if sum(len(m.content) for m in messages) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(render_chat, valid.model.name, tokenizer, messages)
        return render_chat(valid.model.name, tokenizer, messages)
    text = valid.prompt or ""
    if len(text) > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(tokenizer.encode, text)
    return tokenizer.encode(text)


def _piece(job: Job, detok: Detokenizer, token_ids: list[int]) -> tuple[inference_pb2.GenerateResponse, bool]:
    """The response for new token ids: their text, and only the ids before a stop string; True once stopped."""
    delta = detok.feed(token_ids)
    kept = token_ids[:delta.consumed] if delta.stopped else token_ids
    return inference_pb2.GenerateResponse(request_id=job.request_id, text=delta.text, token_ids=kept), delta.stopped


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, view: LiveView, pipeline: Pipeline, catalog: ModelCatalog, metrics: RouterMetrics) -> None:
        self.view = view
        self.pipeline = pipeline
        self.catalog = catalog
        self.metrics = metrics

    def _specs(self) -> dict[str, registry_pb2.ModelSpec]:
        return {name: entry.record for name, entry in self.view.registry.entries(Kind.MODEL).items()}

    async def _prepare(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> tuple[ValidRequest, Job, Detokenizer]:
        fleet = self.view.fleet()
        specs = self._specs()
        limits = self.catalog.limits(fleet, specs)
        valid = validate_generate(request, limits)
        worker = next((self.view.worker_record(c.worker_id) for c in fleet.candidates(valid.model.name)), None)
        try:
            tokenizer = self.catalog.tokenizer(valid.model.name, specs.get(valid.model.name), worker)
        except TokenizerUnavailable as exc:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        if valid.model.vocab_size == 0:
            # The tokenizer just loaded: validate again so token ids are range-checked.
            valid = validate_generate(request, self.catalog.limits(fleet, specs))
        ids = await _prompt_ids(valid, tokenizer)
        valid = check_prompt(valid, ids)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        assert valid.prompt_token_ids is not None
        sampling = valid.sampling
        if not sampling.greedy and sampling.seed is None:
            # One seed for the whole request: prefill, decode and any migration draw from the same
            # stream, so a migrated sequence continues exactly as it would have.
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(63))
        job = Job(valid.request_id, valid.model.name, valid.prompt_token_ids, sampling, deadline)
        return valid, job, Detokenizer(tokenizer, stop=valid.sampling.stop, context_ids=valid.prompt_token_ids)

    async def _stream(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                      *, whole: bool = False) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """GenerateResponses as tokens arrive; with `whole`, one response with all of them, then the last.

        Detokenizing once (Complete) instead of per batch saves the router
        most of its per-token work when nobody watches the stream.
        """
        started = time.monotonic()
        status = "OK"
        try:
            _, job, detok = await self._prepare(request, context)
        except RequestError as exc:
            self.metrics.requests.labels(model="", status=exc.code.name).inc()
            await context.abort(exc.code, cap(exc.message))
        with request_scope(job.request_id):
            sent = 0
            held: list[int] = []
            steps = self.pipeline.run(job)
            try:
                async with contextlib.aclosing(steps):
                    async for item in steps:
                        if isinstance(item, Outcome):
                            if held:
                                piece, stopped = _piece(job, detok, held)
                                sent += len(piece.token_ids)
                                yield piece
                                if stopped:
                                    item.finish_reason = FinishReason.STOP_STRING
                            yield self._last(job, detok, item, sent)
                            self.metrics.observe(item, job.model)
                            break
                        if whole:
                            held.extend(item)
                            continue
                        piece, stopped = _piece(job, detok, item)
                        sent += len(piece.token_ids)
                        yield piece
                        if stopped:
                            # The engine stops on the same token; there is nothing left to wait for.
                            yield self._last(job, detok, Outcome(finish_reason=FinishReason.STOP_STRING), sent)
                            break
            except RouteFailure as exc:
                status = exc.code.name
                log.warning("request failed: %s", exc.message, extra={"code": exc.code.name})
                if exc.retry_after_s:
                    context.set_trailing_metadata(retry_hint_metadata(exc.retry_after_s))
                await context.abort(exc.code, cap(exc.message))
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            finally:
                self.metrics.requests.labels(model=job.model, status=status).inc()
                self.metrics.e2e.labels(model=job.model).observe(time.monotonic() - started)

    def _last(self, job: Job, detok: Detokenizer, outcome: Outcome, sent: int) -> inference_pb2.GenerateResponse:
        tail = detok.finish()
        return inference_pb2.GenerateResponse(
            request_id=job.request_id,
            text=tail.text,
            finish_reason=finish_reason_to_proto(outcome.finish_reason),
            usage=common_pb2.Usage(prompt_tokens=len(job.prompt), completion_tokens=sent,
                                   cached_prompt_tokens=outcome.cached_prompt_tokens),
            timings=common_pb2.Timings(
                queue_ms=outcome.queue_ms, prefill_ms=outcome.prefill_ms, kv_transfer_ms=outcome.kv_transfer_ms,
                ttft_ms=outcome.ttft_ms, mean_inter_token_ms=outcome.mean_inter_token_ms,
                e2e_ms=outcome.e2e_ms, decode_ms=outcome.decode_ms),
            route=inference_pb2.RouteInfo(
                prefill_worker_id=outcome.prefill_worker_id, decode_worker_id=outcome.decode_worker_id,
                local_prefill=outcome.local_prefill, reason=outcome.reason, migrations=outcome.migrations,
                retries=outcome.retries),
        )

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for response in self._stream(request, context):
            yield response

    async def Complete(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.CompleteResponse:
        text: list[str] = []
        token_ids: list[int] = []
        last = inference_pb2.GenerateResponse()
        async for response in self._stream(request, context, whole=True):
            text.append(response.text)
            token_ids.extend(response.token_ids)
            last = response
        return inference_pb2.CompleteResponse(
            request_id=last.request_id, text="".join(text), token_ids=token_ids, finish_reason=last.finish_reason,
            usage=last.usage, timings=last.timings, route=last.route)

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        fleet = self.view.fleet()
        response = inference_pb2.ListModelsResponse()
        specs = self._specs()
        for name, limits in sorted(self.catalog.limits(fleet, specs).items()):
            prefill, decode = fleet.routable_counts(name)
            worker = next((self.view.worker_record(c.worker_id) for c in fleet.candidates(name)), None)
            try:
                chat = self.catalog.tokenizer(name, specs.get(name), worker).chat_template is not None
            except TokenizerUnavailable:
                chat = False
            response.models.append(inference_pb2.ModelInfo(
                name=name, max_context_tokens=limits.max_context_tokens, max_output_tokens=limits.max_output_tokens,
                prefill_workers=prefill, decode_workers=decode, chat=chat))
        return response
