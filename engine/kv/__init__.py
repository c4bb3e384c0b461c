"""KV cache movement between workers: handle store, transports (grpc, tcp, shm), layout conversions.

The services use `KvExporter` (prefill side) and `fetch_kv` (decode side) from
engine.kv.exporter, re-exported here lazily so importing engine.kv.checksum
stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvExporter", "KvNotFound", "KvTransferError", "fetch_kv"]


def __getattr__(name: str) -> Any:
    if name in ("KvExporter", "fetch_kv"):
        from engine.kv import exporter

        return getattr(exporter, name)
    if name in ("KvNotFound", "KvTransferError"):
        from engine.kv import transport

        return getattr(transport, name)
    raise AttributeError(name)
