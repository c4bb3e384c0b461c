"""The `shm` KV transport: producer and consumer on one host share a POSIX shared-memory segment.

Producer: copies the payload into a new segment named in transport_params
(`segment`, `size`) and keeps it until Release or expiry, which unlink it.
The store then drops its own copy, so the payload lives in one place.
Segments are named `tandem-kv-<producer pid>-<random>`; a producer that
starts removes the segments of producers no longer running (a worker that
died without releasing its handles), so a crash leaks nothing past the
next worker start on the host. (multiprocessing's `SharedMemory` would
instead tell its resource-tracker process about every segment it creates
and unlinks: two pipe writes and a wake-up of another process per request.)

Consumer: maps the segment's file under /dev/shm and hands that mapping
out as the payload: no copy at all. The producer's Release unlinks the
name; the consumer's pages stay valid until its last reference goes (tmpfs
keeps them until then). Linux only, like the rest of the data path.

No checksum: the bytes never leave the host's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import secrets

import grpc

from engine.kv.handles import KvEntry
from engine.kv.transport import KvNotFound, KvTransferError, ProducerBase
from tandem.v1.common_pb2 import KvHandle

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "tandem-kv-"
_SLICE = 64 << 20


class Producer(ProducerBase):
    """Segments per handle; the store's release/expiry unlinks them. close() safe twice."""

    name = "shm"

    async def start(self) -> None:
        swept = sweep_orphans()
        if swept:
            log.info("removed %d shm KV segments of producers no longer running", swept)

    def serves(self, consumer_host: str, local_host: str) -> bool:
        return bool(consumer_host) and consumer_host in (local_host, "localhost", "127.0.0.1", "::1")

    async def prepare(self, entry: KvEntry) -> None:
        size = entry.payload.nbytes
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, max(size, 1))
            mapping = mmap.mmap(fd, max(size, 1))
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        try:
            view = memoryview(mapping)
            for offset in range(0, size, _SLICE):
                view[offset:offset + _SLICE] = entry.payload[offset:offset + _SLICE]
                if size > _SLICE:
                    await asyncio.sleep(0)
            view.release()
        except BaseException:
            mapping.close()
            _unlink(path)
            raise
        entry.params.update(segment=name, size=str(size))
        # gRPC Pull (the fallback) reads the segment; the store's own copy can go.
        entry.payload = memoryview(mapping)[:size]
        previous = entry.on_release

        def unlink() -> None:
            entry.payload.release()
            _unlink(path)
            # Unmapping a large segment takes a while: answer the Release first, unmap on the next loop turn.
            try:
                asyncio.get_running_loop().call_soon(mapping.close)
            except RuntimeError:
                mapping.close()
            if previous is not None:
                previous()

        entry.on_release = unlink


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _owner(name: str) -> int | None:
    """The producer pid a segment name carries, or None (not ours, or an older name without one)."""
    pid, sep, _ = name.removeprefix(PREFIX).partition("-")
    return int(pid) if name.startswith(PREFIX) and sep and pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def sweep_orphans(directory: str = SHM_DIR) -> int:
    """Unlinks the segments whose producer is no longer running; returns how many. Never touches a live one's."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    swept = 0
    for name in names:
        pid = _owner(name)
        if pid is not None and pid != os.getpid() and not _running(pid):
            _unlink(os.path.join(directory, name))
            swept += 1
    return swept


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
