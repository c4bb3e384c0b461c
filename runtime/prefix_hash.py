"""The KV block hash engines publish and routers look up: chained, over fixed-size token blocks. Pure.

A prompt's KV cache is cut into blocks of `block_size` tokens. Block i's
hash names the whole prefix `tokens[: (i + 1) * block_size]`, not only the
block's own tokens, because it chains the hash of block i - 1:

    h(-1) = ROOT_HASH
    h(i)  = int.from_bytes(blake2b(le64(h(i - 1)) + le32(t) for t in block i, digest_size=8), "little")

where le64/le32 are unsigned little-endian encodings, the token ids are
the model's (0 <= id < 2**32), and blake2b is RFC 7693 with no key, salt
or personalisation. Only full blocks have a hash; a trailing partial block
has none. Equal hashes mean equal prefixes (up to a 2**-64 collision,
which costs only a mispriced prefill: the engine checks its own cache, the
router's index only steers).

Any engine may implement it in a few lines from this description; an
engine whose cache hashes otherwise (vLLM) publishes these hashes computed
from the same token ids. `ROOT_HASH` is fixed: every worker of a model
and every router must agree, across processes and restarts (Python's
`hash()` of bytes is salted per process, so it is not used).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator, Sequence
from hashlib import blake2b

# The parent of block 0 (an arbitrary odd constant; changing it is a wire change).
ROOT_HASH = 0x2545F4914F6CDD1D
HASH_BYTES = 8

_TOKEN_BYTES = 4
if array("I").itemsize != _TOKEN_BYTES:  # pragma: no cover - every CPython platform we run on has 4-byte uint
    raise ImportError("runtime.prefix_hash needs array('I') of 4 bytes")


def _le32(tokens: Sequence[int]) -> bytes:
    data = array("I", tokens)
    if sys.byteorder == "big":  # pragma: no cover - the wire form is little-endian everywhere
        data.byteswap()
    return data.tobytes()


def chain(parent: int, block_tokens: Sequence[int]) -> int:
    """The hash of a block of `block_tokens` whose preceding block hashed to `parent` (ROOT_HASH for block 0)."""
    digest = blake2b(parent.to_bytes(HASH_BYTES, "little"), digest_size=HASH_BYTES)
    digest.update(_le32(block_tokens))
    return int.from_bytes(digest.digest(), "little")


def block_hashes(tokens: Sequence[int], block_size: int, *, max_blocks: int | None = None,
                 parent: int = ROOT_HASH, first_block: int = 0) -> list[int]:
    """Hashes of the full blocks of `tokens`, in order (at most `max_blocks` of them).

    `parent` and `first_block` continue a chain: the hashes of blocks
    `first_block`, `first_block + 1`, ... given that block `first_block - 1`
    hashed to `parent`. Cost: one blake2b of 8 + 4 * block_size bytes per block.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    count = len(tokens) // block_size - first_block
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count <= 0:
        return []
    start = first_block * block_size
    data = _le32(tokens[start: start + count * block_size])
    step = block_size * _TOKEN_BYTES
    hashes = []
    for i in range(count):
        digest = blake2b(parent.to_bytes(HASH_BYTES, "little"), digest_size=HASH_BYTES)
        digest.update(data[i * step: (i + 1) * step])
        parent = int.from_bytes(digest.digest(), "little")
        hashes.append(parent)
    return hashes


def iter_block_hashes(tokens: Sequence[int], block_size: int, max_blocks: int) -> Iterator[int]:
    """`block_hashes(tokens, block_size, max_blocks=max_blocks)`, computed as consumed: a reader that
    stops at the first block nobody holds pays only for the blocks it looked at."""
    count = min(len(tokens) // block_size, max_blocks)
    step = block_size * _TOKEN_BYTES
    data = _le32(tokens[: count * block_size]) if count > 0 else b""
    parent = ROOT_HASH
    for i in range(count):
        digest = blake2b(parent.to_bytes(HASH_BYTES, "little"), digest_size=HASH_BYTES)
        digest.update(data[i * step: (i + 1) * step])
        parent = int.from_bytes(digest.digest(), "little")
        yield parent


def prefix_blocks(num_tokens: int, block_size: int) -> int:
    """Full blocks of a prompt that a prefix cache may serve: never the last token (it yields the next one)."""
    return max(0, num_tokens - 1) // block_size if block_size > 0 else 0
