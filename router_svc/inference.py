"""The request handling both public fronts share: validate, tokenize, run the pipeline, detokenize.

The gRPC servicer (router_svc.servicer) and the OpenAI-compatible HTTP
front (router_svc.http) each translate their wire format to a
GenerateRequest, iterate `InferenceCore.generate(...)` and translate what
comes back. Nothing here knows either wire: errors are raised, not answered.

Contract of `generate(request, ...)`: an async generator of
GenerateResponses, the last one carrying finish reason, usage, timings and
the route; every one carries the request id. Before the first response it
raises RequestError (the request is invalid, names an unknown model, or its
tokenizer is missing); at any point it may raise RouteFailure (no worker,
no capacity, the fleet failed the request). Closing it early (the client
went away) cancels the worker calls and frees the worker's sequence. Log
lines emitted while it runs carry the request id, and so do the caller's
between its steps (the id is set in the iterating task's context).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncGenerator, Sequence

import grpc

from engine.base import Tokenizer
from engine.chat_template import ChatMessage
from engine.detokenizer import Detokenizer
from registry.keys import Kind
from router_svc.candidates import FleetView
from router_svc.demand_window import DemandWindow
from router_svc.live_view import LiveView
from router_svc.metrics import RouterMetrics
from router_svc.models import ModelCatalog, TokenizerUnavailable
from router_svc.pipeline import Job, Outcome, Pipeline, RouteFailure
from router_svc.validation import ModelLimits, RequestError, ValidRequest, check_prompt, validate_generate
from runtime.logs import request_scope
from runtime.sampling import FinishReason, InvalidRequest, finish_reason_to_proto
from tandem.v1 import common_pb2, inference_pb2, registry_pb2

__all__ = [
    "DEFAULT_STREAM_INTERVAL_MS", "INLINE_TOKENIZE_CHARS", "InferenceCore", "RequestError", "RouteFailure",
    "render_chat",
]

log = logging.getLogger(__name__)

# Prompts longer than this (characters of text or chat content) are tokenized on a worker thread,
# so one client's long prompt does not stall every other stream on the event loop. Shorter ones
# are cheaper to encode inline than to hand over.
INLINE_TOKENIZE_CHARS = 16 * 1024
# A unary answer (Complete, a non-streamed HTTP completion) is delivered whole: the decode worker may hold
# its steps this long between messages (DecodeRequest.flush_interval_ms). A migration then resumes from
# the tokens received, at most this much work behind.
WHOLE_ANSWER_FLUSH_MS = 50
# A streamed answer: the decode worker sends tokens that come faster than this together, one message per
# interval. A real GPU's tokens come slower and each still goes alone, at once; a fast engine's would
# otherwise cost the worker, the router and the client one message (and one server-sent event) each.
DEFAULT_STREAM_INTERVAL_MS = 2


def render_chat(model: str, tokenizer: Tokenizer, messages: Sequence[ChatMessage],
                add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids of a chat, through the model's own template; RequestError when it cannot be rendered."""
    template = tokenizer.chat_template
    if template is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"model {model!r} has no chat template (its checkpoint's tokenizer config names none); "
                           f"send prompt instead of messages (over HTTP: POST /v1/completions)")
    try:
        return tokenizer.encode_rendered_chat(template.render(messages, add_generation_prompt=add_generation_prompt))
    except InvalidRequest as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


async def _prompt_ids(valid: ValidRequest, tokenizer: Tokenizer, add_generation_prompt: bool) -> Sequence[int]:
    """The prompt as token ids; a long one is tokenized off the event loop (the tokenizers release the GIL).

    validate_generate has already refused text too long for the context, so
    the work here is bounded by the context size.
    """
    if valid.prompt_token_ids is not None:
        return valid.prompt_token_ids
    if valid.messages is not None:
        messages = valid.messages
        if sum(len(m.content) for m in messages) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(render_chat, valid.model.name, tokenizer, messages, add_generation_prompt)
        return render_chat(valid.model.name, tokenizer, messages, add_generation_prompt)
    text = valid.prompt or ""
    if len(text) > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(tokenizer.encode, text)
    return tokenizer.encode(text)


def _piece(job: Job, detok: Detokenizer, token_ids: list[int]) -> tuple[inference_pb2.GenerateResponse, bool]:
    """The response for new token ids: their text, and only the ids before a stop string; True once stopped."""
    delta = detok.feed(token_ids)
    kept = token_ids[:delta.consumed] if delta.stopped else token_ids
    return inference_pb2.GenerateResponse(request_id=job.request_id, text=delta.text, token_ids=kept), delta.stopped


class InferenceCore:
    """One per router process; shared by every front and every request, on one event loop."""

    def __init__(self, view: LiveView, pipeline: Pipeline, catalog: ModelCatalog, metrics: RouterMetrics,
                 demand: DemandWindow | None = None, *, stream_interval_ms: int = DEFAULT_STREAM_INTERVAL_MS) -> None:
        self.view = view
        self.stream_interval_ms = stream_interval_ms
        self._limits_fleet: FleetView | None = None
        self._limits_key: tuple[int, int] = (-1, -1)
        self._limits_value: tuple[dict[str, registry_pb2.ModelSpec], dict[str, ModelLimits]] = ({}, {})
        self.pipeline = pipeline
        self.catalog = catalog
        self.metrics = metrics
        # What the planner reads (router_svc.demand_window): every accepted request's size and latency.
        self.demand = demand or DemandWindow()

    def _specs(self) -> dict[str, registry_pb2.ModelSpec]:
        return {name: entry.record for name, entry in self.view.registry.entries(Kind.MODEL).items()}

    def _limits(self, fleet: FleetView) -> tuple[dict[str, registry_pb2.ModelSpec], dict[str, ModelLimits]]:
        """Model specs and limits for `fleet`, computed again only when the fleet, the registry or the
        loaded tokenizers changed: they cost a pass over every worker, and requests far outnumber changes."""
        key = (self.view.registry.revision, self.catalog.loaded_tokenizers)
        if fleet is not self._limits_fleet or key != self._limits_key:
            specs = self._specs()
            self._limits_value = (specs, self.catalog.limits(fleet, specs))
            self._limits_fleet, self._limits_key = fleet, key
        return self._limits_value

    async def _prepare(self, request: inference_pb2.GenerateRequest, deadline: float | None,
                       add_generation_prompt: bool) -> tuple[Job, Detokenizer]:
        fleet = self.view.fleet()
        specs, limits = self._limits(fleet)
        valid = validate_generate(request, limits)
        worker = next((self.view.worker_record(c.worker_id) for c in fleet.candidates(valid.model.name)), None)
        try:
            tokenizer = self.catalog.tokenizer(valid.model.name, specs.get(valid.model.name), worker)
        except TokenizerUnavailable as exc:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        if valid.model.vocab_size == 0:
            # The tokenizer just loaded: validate again so token ids are range-checked.
            valid = validate_generate(request, self._limits(fleet)[1])
        ids = await _prompt_ids(valid, tokenizer, add_generation_prompt)
        valid = check_prompt(valid, ids)
        assert valid.prompt_token_ids is not None
        sampling = valid.sampling
        if not sampling.greedy and sampling.seed is None:
            # One seed for the whole request: prefill, decode and any migration draw from the same
            # stream, so a migrated sequence continues exactly as it would have.
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(63))
        job = Job(valid.request_id, valid.model.name, valid.prompt_token_ids, sampling, deadline)
        return job, Detokenizer(tokenizer, stop=valid.sampling.stop, context_ids=valid.prompt_token_ids)

    async def generate(self, request: inference_pb2.GenerateRequest, *, deadline: float | None = None,
                       whole: bool = False, add_generation_prompt: bool = True,
                       ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """GenerateResponses as tokens arrive; with `whole`, one response with all of them, then the last.

        `deadline` is an absolute time.monotonic() time (None: none). Detokenizing
        once (`whole`) instead of per batch saves the router most of its
        per-token work when nobody watches the stream.
        """
        started = time.monotonic()
        try:
            job, detok = await self._prepare(request, deadline, add_generation_prompt)
        except RequestError as exc:
            self.metrics.requests.labels("", exc.code.name).inc()
            raise
        job = dataclasses.replace(job, flush_interval_ms=WHOLE_ANSWER_FLUSH_MS if whole else self.stream_interval_ms)
        self.demand.arrived(job.model, len(job.prompt), time.monotonic())
        status = "OK"
        outcome: Outcome | None = None
        # True once the last response is built: a caller that stops after it has not cancelled anything.
        done = False
        with request_scope(job.request_id):
            sent = 0
            held: list[int] = []
            steps = self.pipeline.run(job)
            try:
                async with contextlib.aclosing(steps):
                    async for item in steps:
                        if isinstance(item, Outcome):
                            outcome = item
                            if held:
                                piece, stopped = _piece(job, detok, held)
                                sent += len(piece.token_ids)
                                yield piece
                                if stopped:
                                    item.finish_reason = FinishReason.STOP_STRING
                            last = self._last(job, detok, item, sent)
                            self.metrics.observe(item, job.model)
                            done = True
                            yield last
                            break
                        if whole:
                            held.extend(item)
                            continue
                        piece, stopped = _piece(job, detok, item)
                        sent += len(piece.token_ids)
                        yield piece
                        if stopped:
                            # The engine stops on the same token; there is nothing left to wait for.
                            done = True
                            yield self._last(job, detok, Outcome(finish_reason=FinishReason.STOP_STRING), sent)
                            break
            except RouteFailure as exc:
                status = exc.code.name
                log.warning("request failed: %s", exc.message, extra={"code": exc.code.name})
                raise
            except (asyncio.CancelledError, GeneratorExit):
                # GeneratorExit: the front closed the stream early (its client went away).
                if not done:
                    status = "CANCELLED"
                raise
            finally:
                self._finished(job.model, status, outcome, sent)
                self.metrics.requests.labels(job.model, status).inc()
                self.metrics.e2e.labels(job.model).observe(
                    time.monotonic() - started, exemplar={"request_id": job.request_id[:64]})

    def _finished(self, model: str, status: str, outcome: Outcome | None, sent: int) -> None:
        """Notes the end of a request for the demand report; a client's cancel is neither served nor failed."""
        if status == "CANCELLED":
            return
        # A stop string ends the stream before the pipeline's Outcome: served, latencies unknown (0).
        self.demand.finished(model, time.monotonic(), ok=status == "OK", output_tokens=sent,
                             ttft_s=outcome.ttft_ms / 1000 if outcome else 0.0,
                             inter_token_s=outcome.mean_inter_token_ms / 1000 if outcome else 0.0)

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

    async def complete(self, request: inference_pb2.GenerateRequest, *, deadline: float | None = None,
                       add_generation_prompt: bool = True) -> inference_pb2.CompleteResponse:
        """The whole answer at once; raises as `generate` does."""
        text: list[str] = []
        token_ids: list[int] = []
        last = inference_pb2.GenerateResponse()
        steps = self.generate(request, deadline=deadline, whole=True, add_generation_prompt=add_generation_prompt)
        async with contextlib.aclosing(steps):
            async for response in steps:
                text.append(response.text)
                token_ids.extend(response.token_ids)
                last = response
        return inference_pb2.CompleteResponse(
            request_id=last.request_id, text="".join(text), token_ids=token_ids, finish_reason=last.finish_reason,
            usage=last.usage, timings=last.timings, route=last.route)

    def list_models(self) -> inference_pb2.ListModelsResponse:
        """Models the router can serve now, with their limits, routable workers and chat support."""
        fleet = self.view.fleet()
        response = inference_pb2.ListModelsResponse()
        specs, by_model = self._limits(fleet)
        for name, limits in sorted(by_model.items()):
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

    def routable_models(self) -> list[str]:
        """Models with at least one routable decode worker now (it can prefill locally when no prefill worker is)."""
        fleet = self.view.fleet()
        return [name for name in fleet.models() if fleet.routable_counts(name)[1] > 0]
