"""The Decode service: a prefilled sequence in, a stream of tokens out.

With a KV handle the worker checks the layout first (FAILED_PRECONDITION
before moving a byte of an incompatible cache), pulls the KV through the
handle's transport, releases the handle, and decodes from the prefill
worker's first token. Without one it prefills locally. Cancelling the call
closes the engine's sequence at once (its KV blocks are freed).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from engine.base import DecodeRequest, InvalidRequest, KvBlob
from engine.kv.exporter import fetch_kv
from engine.kv.layout import layout_from_proto
from runtime.channels import ChannelPool
from runtime.logs import request_scope
from runtime.sampling import finish_reason_to_proto
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.coalesce import coalesced
from worker.errors import rpc_errors
from worker.process import WorkerContext, WorkerRole

log = logging.getLogger(__name__)


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(self, ctx: WorkerContext, channels: ChannelPool) -> None:
        self.ctx = ctx
        self.channels = channels

    async def Decode(self, request: worker_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        with request_scope(request_id):
            async with rpc_errors(context, lambda status: self.ctx.metrics.requests.labels("Decode", status).inc()):
                engine = self.ctx.engine
                sampling, prompt = self.ctx.check_request(request)
                has_handle = request.HasField("handle")
                if has_handle and not request.HasField("first_token_id"):
                    raise InvalidRequest("first_token_id is required with a KV handle")
                if has_handle and request.handle.num_tokens != len(prompt):
                    raise InvalidRequest(f"the KV handle covers {request.handle.num_tokens} tokens but the prompt "
                                         f"has {len(prompt)}")
                generated = tuple(request.generated_token_ids)
                if len(generated) >= sampling.max_tokens:
                    raise InvalidRequest(f"generated_token_ids already holds {len(generated)} tokens, max_tokens "
                                         f"is {sampling.max_tokens}: nothing left to decode")
                with self.ctx.admission.admit():
                    started = time.perf_counter()
                    blob: KvBlob | None = None
                    if has_handle:
                        # Refuse an incompatible cache before moving any of it.
                        engine.layout.check_compatible(layout_from_proto(request.handle.layout))
                        blob = await fetch_kv(request.handle, channel_factory=self.channels.get)
                    transfer_ms = (time.perf_counter() - started) * 1000
                    if blob is not None:
                        transport = request.handle.transport or "grpc"
                        self.ctx.metrics.kv_transfer_seconds.labels(transport).observe(transfer_ms / 1000)
                        self.ctx.metrics.kv_transfer_bytes.labels(transport).inc(blob.nbytes)
                    decode = engine.decode(DecodeRequest(
                        request_id=request_id, prompt=prompt, sampling=sampling, kv=blob,
                        first_token=request.first_token_id if has_handle else None, generated=generated))
                    produced = 0
                    first = True
                    async with contextlib.aclosing(coalesced(decode)) as steps:
                        async for step in steps:
                            produced += len(step.token_ids)
                            self.ctx.metrics.generated_tokens.inc(len(step.token_ids))
                            response = worker_pb2.DecodeResponse(
                                request_id=request_id, token_ids=step.token_ids,
                                finish_reason=finish_reason_to_proto(step.finish_reason))
                            if first:
                                response.kv_transfer_ms = transfer_ms
                                response.prefill_ms = step.prefill_s * 1000
                                response.queue_ms = step.queue_s * 1000
                                first = False
                            if step.finish_reason is not None:
                                response.usage.CopyFrom(common_pb2.Usage(
                                    prompt_tokens=len(prompt),
                                    completion_tokens=len(generated) + produced + (1 if has_handle else 0)))
                            yield response
                    log.info("decoded", extra={"tokens": produced, "kv_transfer_ms": round(transfer_ms, 2),
                                               "ms": round((time.perf_counter() - started) * 1000, 2)})


class DecodeRole(WorkerRole):
    role = common_pb2.ROLE_DECODE
    role_name = "decode"
    service_names = ("tandem.v1.Decode",)

    def __init__(self) -> None:
        self.channels: ChannelPool | None = None

    def mount(self, ctx: WorkerContext, server: grpc.aio.Server) -> None:
        # KV pulls from prefill workers go over TLS when --peer-ca-file is set.
        self.channels = ChannelPool(ctx.settings.peer_tls())
        worker_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(ctx, self.channels), server)

    async def close(self) -> None:
        if self.channels is not None:
            await self.channels.close()
