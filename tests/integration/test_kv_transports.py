"""KV transports end to end: a real grpc.aio server on 127.0.0.1:0 with a KvExporter mounted."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from engine.base import KvBlob, KvLayoutSpec
from engine.kv.exporter import KvExporter, default_channel, fetch_kv
from engine.kv.grpc_transport import KvSourceServicer
from engine.kv.grpc_transport import fetch as grpc_fetch
from engine.kv.shm_transport import SHM_DIR
from engine.kv.transport import KvNotFound, KvTransferError
from tandem.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

LAYOUT = KvLayoutSpec("fp-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Producer:
    exporter: KvExporter
    endpoint: str
    clock: FakeClock
    segments: list[str]

    async def offer(self, data: bytes, transport: str, ttl_s: float | None = None):  # -> KvHandle
        handle = await self.exporter.offer(KvBlob(LAYOUT, 7, data), transports=[transport],
                                           consumer_host="127.0.0.1", ttl_s=ttl_s)
        handle.source_endpoint = self.endpoint
        if "segment" in handle.transport_params:
            self.segments.append(handle.transport_params["segment"])
        return handle

    def leftover_segments(self) -> list[str]:
        """Segments of this producer still in /dev/shm (other processes' segments are not ours to judge)."""
        return [name for name in self.segments if os.path.exists(os.path.join(SHM_DIR, name))]


@pytest.fixture
async def producer() -> AsyncIterator[Producer]:
    clock = FakeClock()
    exporter = KvExporter(host="127.0.0.1", bind_host="127.0.0.1", clock=clock, sweep_interval_s=0.05)
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    worker_pb2_grpc.add_KvSourceServicer_to_server(exporter.servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await exporter.start()
    producer = Producer(exporter, f"127.0.0.1:{port}", clock, [])
    try:
        yield producer
    finally:
        await exporter.close()
        await server.stop(None)
    assert exporter.open_handles == 0
    assert producer.leftover_segments() == []


def _payload(size: int) -> bytes:
    return os.urandom(size)


# The in-process grpc server keeps one task parked for its next incoming call; each call it
# serves (a pull's Release that got there before the cancel, say) replaces that task with a
# new one. grpc's coroutines are Cython's, whose repr has no name
# ("<_cython_3_2_8.coroutine object at 0x...>"): match on the qualified name.
_SERVER_PARKED = ("AioServer._request_call", "AioServer._request_registered_call")


def _new_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since `before`, except this test's own and the grpc server's parked one."""
    return [t for t in asyncio.all_tasks() - before
            if t is not asyncio.current_task()
            and getattr(t.get_coro(), "__qualname__", "") not in _SERVER_PARKED]


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("transport", ["grpc", "tcp", "shm"])
@pytest.mark.parametrize("size", [1, 1000, (9 << 20) + 3])
async def test_round_trip_is_exact_and_releases(producer: Producer, transport: str, size: int) -> None:
    data = _payload(size)
    handle = await producer.offer(data, transport)
    assert handle.transport == transport and handle.nbytes == size and handle.num_tokens == 7

    blob = await fetch_kv(handle)

    assert bytes(blob.data) == data
    assert blob.layout == LAYOUT and blob.num_tokens == 7
    assert producer.exporter.open_handles == 0  # fetch_kv released it
    assert producer.leftover_segments() == []


@pytest.mark.parametrize("transport", ["grpc", "tcp", "shm"])
async def test_unknown_or_released_handle_is_not_found_naming_it(producer: Producer, transport: str) -> None:
    handle = await producer.offer(b"x" * 100, transport)
    assert producer.exporter.release(handle.handle_id)
    assert not producer.exporter.release(handle.handle_id)  # idempotent

    with pytest.raises(KvNotFound, match=handle.handle_id):
        await fetch_kv(handle)


async def test_grpc_pull_of_unknown_handle_is_grpc_not_found(producer: Producer) -> None:
    async with default_channel(producer.endpoint) as channel:
        stub = worker_pb2_grpc.KvSourceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Pull(worker_pb2.KvPullRequest(handle_id="no-such-handle")):
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-handle" in (caught.value.details() or "")
        released = await stub.Release(worker_pb2.KvReleaseRequest(handle_id="no-such-handle"))
        assert released.released is False


@pytest.mark.parametrize("transport", ["grpc", "tcp", "shm"])
async def test_expired_handle_is_not_found_and_freed_by_the_sweeper(producer: Producer, transport: str) -> None:
    handle = await producer.offer(b"y" * 4096, transport, ttl_s=5.0)
    producer.clock.now += 5.0

    await _wait_for(lambda: producer.exporter.open_handles == 0)
    assert producer.leftover_segments() == []
    with pytest.raises(KvNotFound, match=handle.handle_id):
        await fetch_kv(handle)


class CorruptingServicer(KvSourceServicer):
    """Flips a byte of every chunk after the checksum was computed: corruption on the wire."""

    async def Pull(self, request, context):
        async for chunk in super().Pull(request, context):
            chunk.data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
            yield chunk


async def test_grpc_checksum_mismatch_is_detected(producer: Producer) -> None:
    handle = await producer.offer(b"z" * 10_000, "grpc")
    server = grpc.aio.server()
    worker_pb2_grpc.add_KvSourceServicer_to_server(CorruptingServicer(producer.exporter.store), server)
    handle.source_endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        with pytest.raises(KvTransferError, match="CRC32C mismatch"):
            await fetch_kv(handle)
    finally:
        await server.stop(None)
    assert producer.exporter.open_handles == 0  # a corrupt payload is released at once


async def test_tcp_checksum_mismatch_is_detected(producer: Producer) -> None:
    handle = await producer.offer(b"w" * 10_000, "tcp")
    handle.crc32c ^= 1  # the payload no longer matches the handle's checksum

    with pytest.raises(KvTransferError, match="CRC32C mismatch"):
        await fetch_kv(handle)


async def test_tcp_token_works_once_and_grpc_pull_still_serves(producer: Producer) -> None:
    data = _payload(5000)
    handle = await producer.offer(data, "tcp")
    assert bytes((await fetch_kv(handle, release=False)).data) == data

    with pytest.raises(KvNotFound):
        await fetch_kv(handle, release=False)
    async with default_channel(producer.endpoint) as channel:
        assert bytes(await grpc_fetch(handle, channel)) == data
    assert producer.exporter.release(handle.handle_id)


@pytest.mark.parametrize("transport", ["grpc", "tcp", "shm"])
async def test_cancel_mid_pull_leaks_nothing(producer: Producer, transport: str) -> None:
    handle = await producer.offer(_payload(256 << 20), transport, ttl_s=5.0)
    tasks_before = asyncio.all_tasks()
    pull = asyncio.create_task(fetch_kv(handle))
    await asyncio.sleep(0.005)  # let it start; cancelling at any point must be clean
    pull.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pull

    producer.clock.now += 5.0
    await _wait_for(lambda: producer.exporter.open_handles == 0)
    assert producer.leftover_segments() == []
    await _wait_for(lambda: not _new_tasks(tasks_before))


async def test_release_mid_pull_ends_the_grpc_stream(producer: Producer) -> None:
    handle = await producer.offer(_payload(64 << 20), "grpc")
    async with default_channel(producer.endpoint) as channel:
        stub = worker_pb2_grpc.KvSourceStub(channel)
        call = stub.Pull(worker_pb2.KvPullRequest(handle_id=handle.handle_id, max_chunk_bytes=1 << 20))
        first = await call.read()
        assert first.offset == 0
        assert producer.exporter.release(handle.handle_id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_shm_is_chosen_only_for_a_same_host_consumer(producer: Producer) -> None:
    exporter = producer.exporter
    assert exporter.choose_transport(["shm", "tcp"], "127.0.0.1") == "shm"
    assert exporter.choose_transport(["shm", "tcp"], "other-host") == "tcp"
    assert exporter.choose_transport(["nixl"], "other-host") == "grpc"
    assert exporter.choose_transport([], "") == "grpc"
