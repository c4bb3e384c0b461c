"""The `tcp` KV transport: a raw socket data channel beside the gRPC control path.

Producer: one listening socket per exporter. Each prepared handle gets a
one-time token (128 random bits) in transport_params; the payload's CRC32C
goes into the handle. Consumer: connects, sends the token, reads a header and
the payload straight into one buffer (`recv_into`, no per-chunk copies),
allocated only once the producer's header confirms the handle's size, and
verifies the CRC32C.

Wire, all integers big-endian:
  consumer -> producer: token (32 ASCII hex bytes)
  producer -> consumer: status u32 (0 ok, 1 not found) | size u64, then `size` payload bytes

A token works once; a consumer that needs a second try uses the gRPC Pull.
Release (over gRPC) or expiry invalidates it. A payload being sent when its
handle is released is still sent in full (the socket holds the buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import struct
import threading

import grpc

from engine.kv.checksum import crc32c
from engine.kv.handles import HandleStore, KvEntry
from engine.kv.transport import KvNotFound, KvTransferError, ProducerBase, allocate
from tandem.v1.common_pb2 import KvHandle

_HEADER = struct.Struct(">IQ")
_TOKEN_BYTES = 32
_RECV_CHUNK = 64 << 20
_SOCKET_BUFFER = 4 << 20


class Producer(ProducerBase):
    """Serves payloads on one TCP port. start() once; close() safe twice."""

    name = "tcp"

    def __init__(self, store: HandleStore, *, bind_host: str = "0.0.0.0", port: int = 0, **options: object) -> None:
        super().__init__(store)
        self._bind = (bind_host, port)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tokens: dict[str, str] = {}  # token -> handle id
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        sock = socket.create_server(self._bind)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock), name="kv-tcp-accept")

    async def prepare(self, entry: KvEntry) -> None:
        token = secrets.token_hex(_TOKEN_BYTES // 2)
        self._tokens[token] = entry.handle_id
        entry.params.update(port=str(self.port), token=token)
        entry.crc32c = await _crc(entry.payload)
        previous = entry.on_release

        def forget() -> None:
            self._tokens.pop(token, None)
            if previous is not None:
                previous()

        entry.on_release = forget

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._tasks) if t is not None]
        self._accepting = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._tokens.clear()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._serve(conn), name="kv-tcp-send")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            token_buf = memoryview(bytearray(_TOKEN_BYTES))
            received = 0
            async with asyncio.timeout(10.0):
                while received < _TOKEN_BYTES:
                    n = await loop.sock_recv_into(conn, token_buf[received:])
                    if n == 0:
                        return
                    received += n
            handle_id = self._tokens.pop(bytes(token_buf).decode("ascii", "replace"), None)
            entry = self.store.get(handle_id) if handle_id else None
            if entry is None:
                await loop.sock_sendall(conn, _HEADER.pack(1, 0))
                return
            # sock_sendall sends straight from the memoryview, with no copy
            # into a transport buffer (which a 1 GiB write() would make).
            await loop.sock_sendall(conn, _HEADER.pack(0, entry.payload.nbytes))
            await loop.sock_sendall(conn, entry.payload)
        except (OSError, TimeoutError):
            pass  # the consumer went away; it reports the error on its side
        finally:
            conn.close()


async def fetch(handle: KvHandle, channel: grpc.aio.Channel | None = None) -> memoryview:
    """The payload of `handle` over its data socket. KvNotFound / KvTransferError on failure.

    The socket work runs on a worker thread with blocking MSG_WAITALL reads
    (a few large syscalls instead of an event-loop wakeup per socket buffer).
    Cancelling shuts the socket down, which ends the thread's read at once.
    """
    params = handle.transport_params
    try:
        port, token = int(params["port"]), params["token"]
        if not 1 <= port <= 65535 or not token.isascii():
            raise ValueError(port)
    except (KeyError, ValueError):
        raise KvTransferError(f"KV handle {handle.handle_id!r}: tcp transport_params need a port (1..65535) and an "
                              f"ASCII token, got {sorted(params)}") from None
    host = params.get("host") or handle.source_endpoint.rpartition(":")[0].strip("[]") or handle.source_host
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    cancelled = threading.Event()
    worker = asyncio.ensure_future(asyncio.to_thread(_pull_blocking, sock, host, port, token, handle, cancelled))
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        # Shutting down an unconnected socket does nothing: the flag stops a
        # thread that has not connected yet, the shutdown one that has.
        cancelled.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        await asyncio.gather(worker, return_exceptions=True)
        raise
    finally:
        sock.close()


def _pull_blocking(sock: socket.socket, host: str, port: int, token: str, handle: KvHandle,
                   cancelled: threading.Event) -> memoryview:
    try:
        sock.settimeout(30.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        sock.connect((host, port))
        if cancelled.is_set():
            raise KvTransferError(f"KV handle {handle.handle_id!r}: pull cancelled")
        sock.sendall(token.encode("ascii"))
        header = _recv_exactly(sock, memoryview(bytearray(_HEADER.size)), handle)
        status, size = _HEADER.unpack(header)
        if status != 0:
            raise KvNotFound(f"KV handle {handle.handle_id!r} is unknown, released or expired (or its tcp token "
                             "was used already)")
        if size != handle.nbytes:
            raise KvTransferError(f"KV handle {handle.handle_id!r}: producer sends {size} bytes, handle says "
                                  f"{handle.nbytes}")
        buffer = _recv_exactly(sock, allocate(size), handle)
    except OSError as exc:
        raise KvTransferError(f"KV handle {handle.handle_id!r}: tcp data channel to {host}:{port} failed: {exc}") \
            from exc
    if handle.crc32c and crc32c(buffer) != handle.crc32c:
        raise KvTransferError(f"KV handle {handle.handle_id!r}: CRC32C mismatch over the {size}-byte payload")
    return buffer


def _recv_exactly(sock: socket.socket, view: memoryview, handle: KvHandle) -> memoryview:
    received = 0
    while received < view.nbytes:
        n = sock.recv_into(view[received:], min(view.nbytes - received, _RECV_CHUNK), socket.MSG_WAITALL)
        if n == 0:
            raise KvTransferError(f"KV handle {handle.handle_id!r}: tcp data channel closed after {received} of "
                                  f"{view.nbytes} bytes")
        received += n
    return view


async def _crc(view: memoryview) -> int:
    """CRC32C in slices, yielding to the loop between them so a 1 GiB payload never stalls it."""
    value = 0
    step = 64 << 20
    for offset in range(0, view.nbytes, step):
        value = crc32c(view[offset:offset + step], value)
        if view.nbytes > step:
            await asyncio.sleep(0)
    return value
