"""The `shm` KV transport: producer and consumer on one host share a POSIX shared-memory segment.

Producer: copies the payload into a new segment named in transport_params
(`segment`, `size`) and keeps it until Release or expiry, which unlink it.
The store then drops its own copy, so the payload lives in one place.
The segment is registered with multiprocessing's resource tracker, so it is
unlinked even when the producer process dies.

Consumer: maps the segment's file under /dev/shm and hands that mapping
out as the payload: no copy at all. The producer's Release unlinks the
name; the consumer's pages stay valid until its last reference goes (tmpfs
keeps them until then). It does not attach through
`SharedMemory`, whose Python 3.11 resource tracker would unlink the segment
when the consumer exits. Linux only, like the rest of the data path.

No checksum: the bytes never leave the host's memory.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import secrets
from multiprocessing import shared_memory

import grpc

from engine.kv.handles import KvEntry
from engine.kv.transport import KvNotFound, KvTransferError, ProducerBase
from tandem.v1.common_pb2 import KvHandle

SHM_DIR = "/dev/shm"
PREFIX = "tandem-kv-"
_SLICE = 64 << 20


class Producer(ProducerBase):
    """Segments per handle; the store's release/expiry unlinks them. close() safe twice."""

    name = "shm"

    def serves(self, consumer_host: str, local_host: str) -> bool:
        return bool(consumer_host) and consumer_host in (local_host, "localhost", "127.0.0.1", "::1")

    async def prepare(self, entry: KvEntry) -> None:
        size = entry.payload.nbytes
        segment = shared_memory.SharedMemory(name=f"{PREFIX}{secrets.token_hex(8)}", create=True, size=max(size, 1))
        try:
            view = segment.buf
            assert view is not None
            for offset in range(0, size, _SLICE):
                view[offset:offset + _SLICE] = entry.payload[offset:offset + _SLICE]
                if size > _SLICE:
                    await asyncio.sleep(0)
            del view
        except BaseException:
            _unlink(segment)
            raise
        entry.params.update(segment=segment.name, size=str(size))
        # gRPC Pull (the fallback) reads the segment; the store's own copy can go.
        entry.payload = segment.buf[:size]  # type: ignore[index]
        previous = entry.on_release

        def unlink() -> None:
            entry.payload.release()
            try:
                segment.unlink()
            except FileNotFoundError:
                pass
            # Unmapping a large segment takes a while: answer the Release
            # first, unmap on the next loop turn.
            try:
                asyncio.get_running_loop().call_soon(segment.close)
            except RuntimeError:
                segment.close()
            if previous is not None:
                previous()

        entry.on_release = unlink


def _unlink(segment: shared_memory.SharedMemory) -> None:
    segment.close()
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


async def fetch(handle: KvHandle, channel: grpc.aio.Channel | None = None) -> memoryview:
    """The payload of `handle`, mapped from its segment without a copy. KvNotFound when the segment is gone.

    The mapping is populated at once; it stays
    valid after the producer unlinks the segment and is unmapped when the
    last reference to the returned view (or a tensor over it) goes.
    """
    name = handle.transport_params.get("segment", "")
    if not name.startswith(PREFIX) or "/" in name:
        raise KvTransferError(f"KV handle {handle.handle_id!r}: shm segment name {name!r} is not one of ours")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    except FileNotFoundError:
        raise KvNotFound(f"KV handle {handle.handle_id!r} is unknown, released or expired "
                         f"(shm segment {name} is gone)") from None
    try:
        size = os.fstat(fd).st_size
        if size < handle.nbytes:
            raise KvTransferError(f"KV handle {handle.handle_id!r}: segment {name} has {size} bytes, "
                                  f"handle says {handle.nbytes}")
        if handle.nbytes == 0:
            return memoryview(bytearray())
        # Shared, not private: populating a writable private mapping would copy
        # every page. Nobody writes to it; it is writable only so torch can
        # wrap it without a copy.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, handle.nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return memoryview(mapping)
