"""The Prefill service: prompt in, first token and a KV handle out.

Thin over the engine (engine.base.Engine.prefill) and the KV exporter
(engine.kv.exporter.KvExporter), which keeps the KV under a handle until a
decode worker pulls and releases it, or its TTL passes. Mounted on every
worker: Prefill answers only while the worker serves prefill (the role
gate, worker.role_gate); the KV source serves open handles whatever the
role, so a worker switched to decode still hands over the KV it exported.
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from engine.base import PrefillRequest
from engine.kv.exporter import KvExporter
from runtime.logs import request_scope
from runtime.sampling import finish_reason_to_proto
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.context import WorkerContext, WorkerRole
from worker.errors import rpc_errors

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(self, ctx: WorkerContext, exporter: KvExporter, endpoint: list[str]) -> None:
        self.ctx = ctx
        self.exporter = exporter
        # Filled once the server is bound (the port is known only then).
        self._endpoint = endpoint

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        request_id = request.request_id or uuid.uuid4().hex
        arrived = time.perf_counter()
        with request_scope(request_id):
            async with rpc_errors(context, lambda status: self.ctx.metrics.requests.labels("Prefill", status).inc()):
                engine = self.ctx.engine
                sampling, prompt = self.ctx.check_request(request)
                self.ctx.gate.check(common_pb2.ROLE_PREFILL)
                # A full handle store refuses before the engine computes a KV it could not keep.
                self.exporter.store.check_room()
                with self.ctx.gate.serving(common_pb2.ROLE_PREFILL), self.ctx.admission.admit(context.peer()):
                    result = await engine.prefill(PrefillRequest(request_id, prompt, sampling))
                    self.ctx.metrics.prefill_seconds.observe(result.prefill_s)
                    response = worker_pb2.PrefillResponse(
                        request_id=request_id,
                        first_token_id=result.first_token,
                        finish_reason=finish_reason_to_proto(result.finish_reason),
                        queue_ms=result.queue_s * 1000,
                        prefill_ms=result.prefill_s * 1000,
                        cached_prompt_tokens=result.cached_tokens,
                    )
                    if result.kv is not None:
                        handle = await self.exporter.offer(
                            result.kv, transports=list(request.kv_transports), consumer_host=request.consumer_host)
                        self.ctx.metrics.kv_exported_bytes.labels(handle.transport).inc(handle.nbytes)
                        handle.source_worker_id = self.ctx.worker_id
                        handle.source_endpoint = self._endpoint[0]
                        response.handle.CopyFrom(handle)
                log.info("prefilled", extra={"prompt_tokens": len(prompt),
                                             "ms": round((time.perf_counter() - arrived) * 1000, 2),
                                             "transport": response.handle.transport})
                return response
        raise AssertionError("unreachable")  # rpc_errors aborts


class PrefillRole(WorkerRole):
    role = common_pb2.ROLE_PREFILL
    role_name = "prefill"
    service_names = ("tandem.v1.Prefill", "tandem.v1.KvSource")

    def __init__(self) -> None:
        self.exporter: KvExporter | None = None
        self.endpoint: list[str] = [""]

    def mount(self, ctx: WorkerContext, server: grpc.aio.Server) -> None:
        # transports() already drops plaintext tcp when the worker serves TLS.
        self.exporter = KvExporter(transports=ctx.settings.transports(), host=ctx.host,
                                   default_ttl_s=ctx.settings.kv_handle_ttl,
                                   max_handles=ctx.settings.max_kv_handles,
                                   max_bytes=ctx.settings.max_kv_handle_bytes)
        worker_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(ctx, self.exporter, self.endpoint), server)
        worker_pb2_grpc.add_KvSourceServicer_to_server(self.exporter.servicer, server)

    async def started(self, endpoint: str) -> None:
        self.endpoint[0] = endpoint
        assert self.exporter is not None
        await self.exporter.start()

    def fill_load(self, report: worker_pb2.LoadReport) -> None:
        if self.exporter is not None:
            report.open_kv_handles = self.exporter.open_handles

    async def close(self) -> None:
        if self.exporter is not None:
            await self.exporter.close()
