"""The `grpc` KV transport: tandem.v1.KvSource Pull streams the payload in CRC32C-checked chunks.

Producer: `KvSourceServicer(store)` serves Pull and Release for every handle
in the store, whatever its transport (Pull is every transport's fallback).
The prefill service mounts it on its grpc.aio server with
`add_KvSourceServicer_to_server`.

Consumer: `fetch(handle, channel)` pulls into one buffer (allocated with the first chunk) and
verifies each chunk's CRC32C, the offsets and the total size.

Wire: KvChunk{offset, data, crc32c, total_bytes}, in order, default 4 MiB of
data each (the consumer may ask for less or more, capped at 32 MiB so a
chunk stays under the servers' 64 MiB message limit).
"""

from __future__ import annotations

import grpc

from engine.kv.checksum import crc32c
from engine.kv.handles import HandleStore, KvEntry
from engine.kv.transport import KvNotFound, KvTransferError, ProducerBase, allocate
from runtime.text import clip
from tandem.v1 import worker_pb2, worker_pb2_grpc
from tandem.v1.common_pb2 import KvHandle

DEFAULT_CHUNK_BYTES = 4 << 20
MAX_CHUNK_BYTES = 32 << 20
# Channels that carry KV chunks need more than grpc's 4 MiB default.
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
)


def not_found_message(handle_id: str) -> str:
    return f"KV handle {clip(handle_id)} is unknown, released or expired"


class KvSourceServicer(worker_pb2_grpc.KvSourceServicer):
    """tandem.v1.KvSource over a HandleStore. Runs on the store's event loop; may serve many pulls at once."""

    def __init__(self, store: HandleStore) -> None:
        self._store = store

    async def Pull(self, request: worker_pb2.KvPullRequest, context: grpc.aio.ServicerContext):
        entry = self._store.get(request.handle_id)
        if entry is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, not_found_message(request.handle_id))
            return
        chunk = min(request.max_chunk_bytes or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
        payload = entry.payload
        total = payload.nbytes
        for offset in range(0, total, chunk):
            # A release (or expiry) mid-pull ends the stream: the consumer must not get half a cache.
            if self._store.get(request.handle_id) is not entry:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"{not_found_message(request.handle_id)} (released during the pull)")
                return
            data = bytes(payload[offset:offset + chunk])
            yield worker_pb2.KvChunk(offset=offset, data=data, crc32c=crc32c(data), total_bytes=total)

    async def Release(self, request: worker_pb2.KvReleaseRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.KvReleaseResponse:
        return worker_pb2.KvReleaseResponse(released=self._store.release(request.handle_id))


class Producer(ProducerBase):
    """Nothing beyond the servicer: the payload stays in the store until released or expired."""

    name = "grpc"

    async def prepare(self, entry: KvEntry) -> None:
        entry.crc32c = 0  # checksummed per chunk


async def fetch(handle: KvHandle, channel: grpc.aio.Channel, *, max_chunk_bytes: int = 0) -> memoryview:
    """The payload of `handle` via KvSource.Pull. KvNotFound / KvTransferError on failure."""
    stub = worker_pb2_grpc.KvSourceStub(channel)
    # Allocated when the first chunk arrives, not before: a handle whose producer
    # sends nothing must not pin nbytes of memory for the length of the pull.
    buffer: memoryview | None = None
    received = 0
    call = stub.Pull(worker_pb2.KvPullRequest(handle_id=handle.handle_id, max_chunk_bytes=max_chunk_bytes))
    try:
        async for chunk in call:
            size = len(chunk.data)
            if chunk.total_bytes != handle.nbytes or chunk.offset != received or received + size > handle.nbytes:
                raise KvTransferError(
                    f"KV handle {handle.handle_id!r}: chunk at offset {chunk.offset} ({size} bytes, total "
                    f"{chunk.total_bytes}) does not follow {received} of {handle.nbytes} bytes"
                )
            if crc32c(chunk.data) != chunk.crc32c:
                raise KvTransferError(f"KV handle {handle.handle_id!r}: CRC32C mismatch in the chunk at offset "
                                      f"{chunk.offset} ({size} bytes)")
            if buffer is None:
                buffer = allocate(handle.nbytes)
            buffer[received:received + size] = chunk.data
            received += size
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise KvNotFound(exc.details() or not_found_message(handle.handle_id)) from None
        raise KvTransferError(f"KV pull of handle {handle.handle_id!r} from {handle.source_endpoint} failed: "
                              f"{exc.code().name} {exc.details()}") from exc
    finally:
        call.cancel()  # no-op when finished; frees the stream when we stop early
    if received != handle.nbytes:
        raise KvTransferError(f"KV handle {handle.handle_id!r}: stream ended at {received} of {handle.nbytes} bytes")
    return buffer if buffer is not None else allocate(0)
