"""The Decode service: a prefilled sequence in, a stream of tokens out.

With a KV handle the worker first checks the handle (worker.handle_check:
a registered prefill worker of this model as its source, an accepted
transport, a size the layout implies, within max_kv_bytes) and the layout
(FAILED_PRECONDITION before it connects anywhere or moves a byte), pulls the
KV through the handle's transport within kv_pull_timeout_s, releases the
handle, and decodes from the prefill worker's first token. Without one it
prefills locally. Cancelling the call closes the engine's sequence at once
(its KV blocks are freed).

Mounted on every worker: Decode answers only while the worker serves decode
(the role gate, worker.role_gate), refusing before any pull. A stream that a
role switch hands over ends with UNAVAILABLE after the tokens it sent; the
router continues it elsewhere from the prompt and those tokens.
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
from engine.kv.transport import KvTransferError, transport_names
from registry.etcd_client import EtcdClient
from registry.keys import Kind
from registry.view import RegistryView
from runtime.channels import ChannelPool
from runtime.logs import request_scope
from runtime.peers import peer_identity
from runtime.sampling import finish_reason_to_proto
from tandem.v1 import common_pb2, registry_pb2, worker_pb2, worker_pb2_grpc
from worker.coalesce import coalesced
from worker.context import WorkerContext, WorkerRole
from worker.errors import rpc_errors
from worker.handle_check import HandlePolicy, UnknownProducer, check_fields, check_handle, handle_accepted

log = logging.getLogger(__name__)

# How long a handle from a worker this view has not seen yet waits for the
# registry watch to catch up (the router's view may be a moment ahead).
PRODUCER_WAIT_S = 1.0
# DecodeRequest.flush_interval_ms above this is taken as this: a held stream must stay far below the
# router's stall timeout.
MAX_FLUSH_INTERVAL_MS = 1000


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(self, ctx: WorkerContext, channels: ChannelPool, producers: RegistryView | None) -> None:
        self.ctx = ctx
        self.channels = channels
        self.producers = producers

    def _policy(self) -> HandlePolicy:
        records = self.producers.records(Kind.WORKER) if self.producers is not None else []
        return HandlePolicy(model=self.ctx.engine.model_name, transports=self.ctx.settings.transports(),
                            max_kv_bytes=self.ctx.settings.max_kv_bytes, producers=records,
                            known_transports=transport_names())

    async def _check_handle(self, handle: common_pb2.KvHandle) -> registry_pb2.WorkerRecord:
        """The producer's record; HandleMalformed / HandleRefused / KvMismatch before any connection to it."""
        check_fields(handle, max_kv_bytes=self.ctx.settings.max_kv_bytes, known_transports=transport_names())
        self.ctx.engine.layout.check_compatible(layout_from_proto(handle.layout))
        try:
            return check_handle(handle, self._policy())
        except UnknownProducer:
            # A producer registered a moment ago may not be in this view yet: wait a little for the watch.
            if self.producers is None or not await self.producers.wait_for(
                    lambda view: handle_accepted(handle, self._policy()), timeout=PRODUCER_WAIT_S):
                raise
            return check_handle(handle, self._policy())

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
                producer_identity = ""
                # A worker serving prefill refuses before it pulls anything (the router retries elsewhere).
                self.ctx.gate.check(common_pb2.ROLE_DECODE)
                if has_handle:
                    # Refuse a forged or incompatible handle before connecting anywhere or taking a slot.
                    producer = await self._check_handle(request.handle)
                    # With identity checks on, the pull's TLS handshake verifies the producer's record too.
                    producer_identity = peer_identity(producer.worker_id, producer.node)
                with self.ctx.gate.serving(common_pb2.ROLE_DECODE) as handover, \
                        self.ctx.admission.admit(context.peer()):
                    started = time.perf_counter()
                    blob: KvBlob | None = None
                    if has_handle:
                        try:
                            blob = await fetch_kv(request.handle,
                                                  channel_factory=lambda ep: self.channels.get(ep, producer_identity),
                                                  timeout_s=self.ctx.settings.kv_pull_timeout_s)
                        except KvTransferError as exc:
                            # A producer whose certificate does not name its record is counted and logged.
                            self.channels.note_failure(request.handle.source_endpoint, producer_identity, str(exc))
                            raise
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
                    hold_s = min(request.flush_interval_ms, MAX_FLUSH_INTERVAL_MS) / 1000
                    async with contextlib.aclosing(coalesced(decode, hold_s, handover)) as steps:
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
                            if step.finish_reason is not None:
                                break  # answered in full: a hand-over from now on must not end it with an error
                    log.info("decoded", extra={"tokens": produced, "kv_transfer_ms": round(transfer_ms, 2),
                                               "ms": round((time.perf_counter() - started) * 1000, 2)})


class DecodeRole(WorkerRole):
    role = common_pb2.ROLE_DECODE
    role_name = "decode"
    service_names = ("tandem.v1.Decode",)

    def __init__(self) -> None:
        self.channels: ChannelPool | None = None
        self.producers: RegistryView | None = None
        self._etcd: EtcdClient | None = None

    def mount(self, ctx: WorkerContext, server: grpc.aio.Server) -> None:
        # KV pulls from prefill workers go over TLS when --peer-ca-file is set.
        self.channels = ChannelPool(ctx.settings.peer_tls())
        # The registered workers, to accept KV handles only from real producers.
        self._etcd = EtcdClient(ctx.settings.etcd_settings())
        keys = ctx.settings.keys()
        self.producers = RegistryView(self._etcd, keys, prefix=keys.kind_prefix(Kind.WORKER), kinds=[Kind.WORKER])
        worker_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(ctx, self.channels, self.producers), server)

    async def started(self, endpoint: str) -> None:
        if self._etcd is not None and self.producers is not None:
            await self._etcd.connect()
            self.producers.start()

    async def close(self) -> None:
        """Safe twice."""
        if self.channels is not None:
            await self.channels.close()
        producers, self.producers = self.producers, None
        if producers is not None:
            await producers.close()
        etcd, self._etcd = self._etcd, None
        if etcd is not None:
            await etcd.close()
