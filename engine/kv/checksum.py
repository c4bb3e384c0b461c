"""CRC32C (Castagnoli), the checksum of every KV chunk and payload.

Uses the `crc32c` package (hardware CRC32 instructions, about 10 GB/s here).
Without it a table-driven pure-Python CRC32C gives the same values at a few
MB/s: correct, but far too slow for large payloads, so a warning says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

_hw_crc32c: Callable[..., int] | None
try:
    from crc32c import crc32c as _hw_crc32c
except ImportError:  # pragma: no cover - exercised only where crc32c is missing
    _hw_crc32c = None


def _table() -> list[int]:
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return table


_TABLE = _table()
_warned = False


def crc32c_slow(data: Buffer, value: int = 0) -> int:
    """Reference CRC32C in pure Python; continues from `value` like the fast one."""
    crc = value ^ 0xFFFFFFFF
    for byte in bytes(data):
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of `data`, continuing from a previous `value` (0 to start)."""
    if _hw_crc32c is not None:
        return int(_hw_crc32c(data, value))
    global _warned
    if not _warned:
        _warned = True
        log.warning("the crc32c package is not installed: KV checksums run in pure Python (slow)")
    return crc32c_slow(data, value)
