"""CRC32C (Castagnoli), the checksum of every KV chunk and payload.

Uses the `crc32c` package (hardware CRC32 instructions, about 10 GB/s here),
a hard dependency of Tandem.
"""

from __future__ import annotations

from crc32c import crc32c as _crc32c

Buffer = bytes | bytearray | memoryview


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC32C of `data`, continuing from a previous `value` (0 to start)."""
    return int(_crc32c(data, value))
