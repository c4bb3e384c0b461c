"""A tokenizer over UTF-8 bytes: every text round-trips, no vocabulary file.

Ids 0..2 are specials (BOS, EOS, PAD); byte ``b`` is id ``b + 3``, so the
vocabulary has 259 ids. The sim engine uses it, and it suits tests that need
a real tokenizer without loading one.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.base import InvalidRequest, Tokenizer

BOS_ID = 0
EOS_ID = 1
PAD_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = BYTE_OFFSET + 256


def byte_token(byte: int) -> int:
    """The id of one byte value (0..255)."""
    return byte + BYTE_OFFSET


def token_bytes(token_ids: Iterable[int]) -> bytes:
    """The raw bytes of `token_ids`; specials contribute nothing.

    Raises InvalidRequest naming the first id outside 0..VOCAB_SIZE-1.
    """
    out = bytearray()
    for token in token_ids:
        if BYTE_OFFSET <= token < VOCAB_SIZE:
            out.append(token - BYTE_OFFSET)
        elif not 0 <= token < BYTE_OFFSET:
            raise InvalidRequest(f"token id must be 0..{VOCAB_SIZE - 1} for the byte tokenizer, got {token}")
    return bytes(out)


class ByteTokenizer(Tokenizer):
    """Stateless; safe to share between tasks and threads."""

    @property
    def eos_token_id(self) -> int:
        return EOS_ID

    @property
    def bos_token_id(self) -> int:
        return BOS_ID

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte of `text`; no BOS is added."""
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, token_ids: list[int]) -> str:
        """Text of the ids; an incomplete or invalid UTF-8 sequence decodes as U+FFFD."""
        return token_bytes(token_ids).decode("utf-8", errors="replace")
