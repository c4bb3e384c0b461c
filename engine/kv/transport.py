"""KV transports: the interface, their errors, and the registry by name with lazy import.

A transport has a producer side (`Producer`: prepares an entry for pulling,
may hold resources such as a data socket or a shared-memory segment) and a
consumer side (`fetch`: pulls a handle's payload into one buffer). The
control path (Release, and Pull as the universal fallback) is always the
KvSource gRPC service; a transport only adds a faster data path.

Each transport module defines `class Producer(ProducerBase)` and
`async def fetch(handle, channel) -> memoryview` (writable, exactly nbytes long).
"""

from __future__ import annotations

import abc
import importlib
import mmap
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import grpc

    from engine.kv.handles import HandleStore, KvEntry
    from tandem.v1.common_pb2 import KvHandle


class KvTransferError(RuntimeError):
    """The payload could not be moved intact (checksum mismatch, short read, connection lost)."""


class KvNotFound(LookupError):
    """The producer has no such handle: unknown, released or expired. The message names the handle."""


class ProducerBase(abc.ABC):
    """Producer side of one transport; owned by a KvExporter. start() once, close() safe twice."""

    name: ClassVar[str]

    def __init__(self, store: HandleStore, **options: Any) -> None:
        self.store = store

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Acquires resources (a listening socket...). Default: nothing."""

    def serves(self, consumer_host: str, local_host: str) -> bool:
        """Whether this transport can reach that consumer (shm: same host only)."""
        return True

    @abc.abstractmethod
    async def prepare(self, entry: KvEntry) -> None:
        """Fills entry.params (and entry.on_release, entry.crc32c) so a consumer can fetch it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Frees resources. Safe twice."""


Fetch = Callable[["KvHandle", "grpc.aio.Channel"], Awaitable[memoryview]]

_TRANSPORTS: dict[str, str] = {
    "grpc": "engine.kv.grpc_transport",
    "tcp": "engine.kv.tcp_transport",
    "shm": "engine.kv.shm_transport",
}


def allocate(size: int) -> memoryview:
    """A writable zeroed buffer of `size` bytes for a payload to land in.

    Large buffers are anonymous mappings populated by the kernel at once: on
    virtual machines, faulting a fresh GiB in page by page from user space
    (what bytearray(size) does) costs more than moving the data.
    """
    if size < (1 << 20):
        return memoryview(bytearray(size))
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, size, flags=flags))


def register_transport(name: str, module: str) -> None:
    """Registers a transport module (defining Producer and fetch) under `name`."""
    _TRANSPORTS[name] = module


def transport_names() -> list[str]:
    return sorted(_TRANSPORTS)


def transport_module(name: str) -> ModuleType:
    """The module of transport `name`; ValueError names the known ones."""
    try:
        target = _TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown KV transport {name!r}; known: {', '.join(transport_names())}") from None
    return importlib.import_module(target)
