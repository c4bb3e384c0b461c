"""KV movement APIs the services call: `KvExporter` on prefill workers, `fetch_kv` on decode workers.

Prefill side:

    exporter = KvExporter(transports=("grpc", "tcp", "shm"), host="10.0.0.5")
    await exporter.start()                      # data sockets, TTL sweeper
    add_KvSourceServicer_to_server(exporter.servicer, server)
    handle = await exporter.offer(blob, transports=request.kv_transports, consumer_host=request.consumer_host)
    handle.source_worker_id, handle.source_endpoint = worker_id, advertised_endpoint
    ...
    await exporter.close()                      # frees every handle; safe twice

Decode side:

    blob = await fetch_kv(handle)               # pulls through handle.transport, verifies, releases

Handles expire after `ttl_s` whatever happens to the consumer: a sweeper task
frees expired payloads (and unlinks their shared memory) every
`sweep_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence

import grpc

from engine.base import KvBlob
from engine.kv.grpc_transport import CHANNEL_OPTIONS, KvSourceServicer
from engine.kv.handles import Clock, HandleStore
from engine.kv.layout import layout_from_proto, layout_to_proto
from engine.kv.selection import PREFERENCE
from engine.kv.transport import KvNotFound, KvTransferError, ProducerBase, transport_module
from runtime.tasks import cancel_and_wait
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tandem.v1.common_pb2 import KvHandle

log = logging.getLogger(__name__)

ChannelFactory = Callable[[str], grpc.aio.Channel]


class KvExporter:
    """Producer side: a HandleStore, its KvSource servicer and the transports' producers.

    start() once, close() safe twice. Runs on one event loop (the prefill service's).
    """

    def __init__(self, *, transports: Sequence[str] = PREFERENCE, host: str = "",
                 bind_host: str = "0.0.0.0", default_ttl_s: float = 30.0, sweep_interval_s: float = 1.0,
                 clock: Clock = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 max_handles: int = 1024, max_bytes: int = 8 << 30) -> None:
        self.store = HandleStore(clock=clock, default_ttl_s=default_ttl_s, max_handles=max_handles,
                                 max_bytes=max_bytes)
        self.servicer = KvSourceServicer(self.store)
        self.host = host or socket.gethostname()
        self._wall = wall_clock
        self._sweep_interval = sweep_interval_s
        names = list(dict.fromkeys(["grpc", *transports]))
        self._producers: dict[str, ProducerBase] = {
            name: transport_module(name).Producer(self.store, bind_host=bind_host) for name in names
        }
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def transports(self) -> list[str]:
        return list(self._producers)

    @property
    def open_handles(self) -> int:
        return len(self.store)

    async def start(self) -> None:
        for producer in self._producers.values():
            await producer.start()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="kv-handle-sweeper")

    async def close(self) -> None:
        """Frees every handle, stops the sweeper and data sockets. Safe twice."""
        sweeper, self._sweeper = self._sweeper, None
        await cancel_and_wait(sweeper)
        self.store.close()
        for producer in self._producers.values():
            await producer.close()

    def choose_transport(self, preferred: Sequence[str], consumer_host: str) -> str:
        """The first of `preferred` this exporter serves and can reach the consumer with; else grpc."""
        for name in preferred:
            producer = self._producers.get(name)
            if producer is not None and producer.serves(consumer_host, self.host):
                return name
        return "grpc"

    async def offer(self, blob: KvBlob, *, transports: Sequence[str] = (), consumer_host: str = "",
                    ttl_s: float | None = None) -> KvHandle:
        """Keeps `blob` under a new handle and returns it (the caller fills source_worker_id/endpoint).

        Raises engine.kv.handles.StoreFull, keeping nothing, when the store is at its caps.
        """
        name = self.choose_transport(transports, consumer_host)
        entry = self.store.put(blob, ttl_s, transport=name)
        try:
            await self._producers[name].prepare(entry)
        except BaseException:
            self.store.release(entry.handle_id)
            raise
        expires_ms = int((self._wall() + self.store.seconds_left(entry)) * 1000)
        return KvHandle(
            handle_id=entry.handle_id,
            source_host=self.host,
            transport=name,
            transport_params=entry.params,
            layout=layout_to_proto(entry.layout),
            num_tokens=entry.num_tokens,
            nbytes=entry.payload.nbytes,
            expires_at_unix_ms=expires_ms,
            crc32c=entry.crc32c,
        )

    def release(self, handle_id: str) -> bool:
        return self.store.release(handle_id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.store.sweep()


def default_channel(endpoint: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)


async def fetch_kv(handle: KvHandle, *, channel_factory: ChannelFactory | None = None, release: bool = True,
                   timeout_s: float | None = None) -> KvBlob:
    """Pulls the payload of `handle` through its transport and releases the handle at the producer.

    Raises KvNotFound (unknown/expired handle), KvTransferError (checksum,
    truncation, connection), ValueError (unknown transport). Cancelling it at
    any point leaves nothing behind here; the producer frees the handle on
    its TTL. `channel_factory(endpoint)` supplies a channel to reuse (it is
    not closed here); without one, a private channel is opened and closed.
    """
    module = transport_module(handle.transport or "grpc")
    own_channel = channel_factory is None
    channel = default_channel(handle.source_endpoint) if channel_factory is None else channel_factory(
        handle.source_endpoint)
    try:
        async with asyncio.timeout(timeout_s):
            data = await module.fetch(handle, channel)
            if release:
                await _release(channel, handle)
    except TimeoutError:
        raise KvTransferError(f"KV handle {handle.handle_id!r}: transfer from {handle.source_endpoint} took "
                              f"longer than {timeout_s} s") from None
    except KvNotFound:
        raise
    except KvTransferError:
        if release:  # the payload is bad; the producer need not keep it for its TTL
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await _release(channel, handle)
        raise
    finally:
        if own_channel:
            await channel.close()
    return KvBlob(layout=layout_from_proto(handle.layout), num_tokens=handle.num_tokens, data=data)


async def _release(channel: grpc.aio.Channel, handle: KvHandle) -> None:
    try:
        await worker_pb2_grpc.KvSourceStub(channel).Release(worker_pb2.KvReleaseRequest(handle_id=handle.handle_id))
    except grpc.aio.AioRpcError as exc:
        # The payload is here already; the producer's TTL frees the handle.
        log.warning("releasing KV handle %s at %s failed: %s", handle.handle_id, handle.source_endpoint,
                    exc.code().name)
