"""Deterministic simulated tokens, and the sim engine's KV payload format. Pure.

The token at absolute position p is a function of the model and of every
token before p (greedy), plus the seed (seeded sampling): the same function
a real model computes, minus the math. So a prompt prefilled on one worker
and decoded on another, or a sequence resumed after `generated` tokens,
continues exactly as it would have in one piece: only the context counts,
not how it was split between prompt, generated tokens and first token.

Tokens are printable ASCII bytes of the byte tokenizer, so their text is
readable and stop strings can match. EOS is never drawn unless `eos_rate`
> 0: then each position draws EOS with that probability (deterministically).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence

from engine.base import KvMismatch
from engine.byte_tokenizer import EOS_ID, byte_token

_PRINTABLE = [byte_token(b) for b in range(0x20, 0x7F)]
_MASK64 = (1 << 64) - 1
_U32 = struct.Struct("<I").pack


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Little-endian uint32 per token, on every platform."""
    packed = array("I", tokens)
    if packed.itemsize != 4:  # pragma: no cover - no mainstream platform
        packed = array("L", tokens)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def _mix(x: int) -> int:
    """splitmix64's finalizer: every input bit moves every output bit."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class TokenStream:
    """Draws the tokens of one sequence. Not shared between sequences.

    `context` is every token before the next position (prompt, earlier
    output); `seed` is None for greedy. `ignore_eos` keeps EOS from being drawn.
    """

    def __init__(
        self, model_key: str, context: Sequence[int], *, seed: int | None, eos_rate: float = 0.0,
        ignore_eos: bool = False,
    ) -> None:
        self._hasher = hashlib.blake2b(digest_size=8, person=b"tandem-sim", key=model_key.encode()[:64])
        self._hasher.update(pack_tokens(context))
        self.position = len(context)
        self._seed = None if seed is None else _mix(seed & _MASK64)
        self._eos_threshold = 0 if ignore_eos else int(eos_rate * (1 << 32))

    def push(self, token: int) -> None:
        """Appends a token to the context (one this stream drew, or one delivered elsewhere)."""
        self._hasher.update(_U32(token))
        self.position += 1

    def peek(self) -> int:
        """The token at `position`, without advancing."""
        x = int.from_bytes(self._hasher.copy().digest(), "little")
        if self._seed is not None:
            x = _mix(x ^ self._seed ^ _mix(self.position))
        if (x >> 32) < self._eos_threshold:
            return EOS_ID
        return _PRINTABLE[(x & 0xFFFFFFFF) % len(_PRINTABLE)]

    def next(self) -> int:
        """Draws the token at `position` and appends it (peek then push, in one call: once per token)."""
        token = self.peek()
        self._hasher.update(_U32(token))
        self.position += 1
        return token


# KV payload: magic, format version, token count, the tokens (uint32 LE);
# with "real" bytes, zero padding up to the simulated KV size.
_MAGIC = b"TSKV"
_HEADER = struct.Struct("<4sII")
_FORMAT = 1


def kv_payload(tokens: Sequence[int], padded_size: int = 0) -> bytes | bytearray:
    """The payload of a KV blob covering `tokens`, at least `padded_size` bytes long."""
    body = _HEADER.pack(_MAGIC, _FORMAT, len(tokens)) + pack_tokens(tokens)
    if padded_size <= len(body):
        return body
    # bytearray(n) is calloc'ed: cheap even at gigabytes.
    payload = bytearray(padded_size)
    payload[: len(body)] = body
    return payload


def payload_tokens(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """The tokens a payload covers; KvMismatch when it is not a sim KV payload."""
    view = memoryview(data).cast("B")
    if view.nbytes < _HEADER.size:
        raise KvMismatch(f"KV payload of {view.nbytes} bytes is too short for the sim engine's format")
    magic, version, count = _HEADER.unpack_from(view)
    if magic != _MAGIC or version != _FORMAT:
        raise KvMismatch(f"KV payload is not sim format {_FORMAT} (magic {magic!r}, version {version})")
    end = _HEADER.size + 4 * count
    if view.nbytes < end:
        raise KvMismatch(f"KV payload is truncated: {count} tokens need {end} bytes, got {view.nbytes}")
    return struct.unpack_from(f"<{count}I", view, _HEADER.size)
