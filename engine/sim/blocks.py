"""KV block accounting with a block-level prefix cache. Pure; no I/O.

A sequence owns a `BlockTable`: the ids of the blocks that hold its KV, in
order. Blocks are reference counted, so sequences with a common prefix share
the prefix's blocks. A full block whose tokens are computed gets a hash that
chains the hash of the block before it with its own token ids, so equal
hashes mean equal prefixes. When its last reference goes, a hashed block is
not freed but kept as *evictable*: a later prompt with the same prefix takes
it back instead of recomputing. Fresh blocks come from the free list first,
then from the least recently released evictable block.

Block hashes are runtime.prefix_hash's, the ones routers look up: every
block that becomes reusable and every one evicted is an event in the
manager's `events` log (engine.kv_events), which workers publish on their
load stream.

Not thread-safe: one event loop owns a manager.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv_events import DEFAULT_CAPACITY, KvEventLog
from runtime.prefix_hash import ROOT_HASH, chain, iter_block_hashes, prefix_blocks


@dataclass(eq=False)
class BlockTable:
    """The blocks of one sequence; `hashes[i]` is block i's chain hash once committed."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)


class BlockManager:
    """`num_blocks` blocks of `block_size` tokens, shared by every sequence of one engine."""

    def __init__(self, num_blocks: int, block_size: int, *, event_capacity: int = DEFAULT_CAPACITY) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: low ids first, which keeps tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._block_of: dict[int, int] = {}
        self._lookup_tokens = 0
        self._hit_tokens = 0
        self.events = KvEventLog(block_size, self._block_of.keys, capacity=event_capacity)

    # -- capacity ---------------------------------------------------------

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return len(self._refs)

    @property
    def num_available(self) -> int:
        """Blocks a new allocation may take: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks holding a reusable prefix (referenced or evictable)."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -----------------------------------------------------

    def cached_prefix_tokens(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens` whose KV a `share_prefix` would find now (whole blocks; never all tokens)."""
        count = 0
        for h in iter_block_hashes(tokens, self.block_size, prefix_blocks(len(tokens), self.block_size)):
            if h not in self._block_of:
                break
            count += 1
        return count * self.block_size

    def share_prefix(self, table: BlockTable, tokens: Sequence[int]) -> int:
        """Takes references on the cached blocks of `tokens`' prefix; returns the tokens they cover.

        `table` must be empty. At least the last token is left uncovered, since
        a step must compute it to produce the next token. Counts nothing
        toward `hit_rate` (see `record_lookup`).
        """
        assert not table.blocks, "share_prefix needs an empty table"
        for h in iter_block_hashes(tokens, self.block_size, prefix_blocks(len(tokens), self.block_size)):
            block = self._block_of.get(h)
            if block is None:
                break
            self._ref(block)
            table.blocks.append(block)
            table.hashes.append(h)
        return len(table.blocks) * self.block_size

    def record_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Counts one prompt's lookup toward `hit_rate`."""
        self._lookup_tokens += prompt_tokens
        self._hit_tokens += cached_tokens

    def commit(self, table: BlockTable, tokens: Sequence[int], num_computed: int) -> None:
        """Registers the full blocks among `tokens[:num_computed]` (now computed) in the prefix cache."""
        full = min(num_computed // self.block_size, len(table.blocks))
        if full <= len(table.hashes):
            return
        bs = self.block_size
        parent = table.hashes[-1] if table.hashes else ROOT_HASH
        for i in range(len(table.hashes), full):
            parent = chain(parent, tokens[i * bs : (i + 1) * bs])
            table.hashes.append(parent)
            block = table.blocks[i]
            # Two sequences may compute the same prefix at once: the first
            # registered copy stays the cached one, the other frees normally.
            if parent not in self._block_of and block not in self._hash_of:
                self._block_of[parent] = block
                self._hash_of[block] = parent
                self.events.stored(parent)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the cache over prompt tokens looked up, 0..1 (lifetime)."""
        return self._hit_tokens / self._lookup_tokens if self._lookup_tokens else 0.0

    # -- allocation -------------------------------------------------------

    def grow(self, table: BlockTable, num_tokens: int) -> bool:
        """Adds blocks until `table` holds `num_tokens` tokens; False (and no change) when too few are left."""
        need = self.blocks_for(num_tokens) - len(table.blocks)
        if need <= 0:
            return True
        if need > self.num_available:
            return False
        for _ in range(need):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                evicted = self._hash_of.pop(block)
                del self._block_of[evicted]
                self.events.removed(evicted)
            self._refs[block] = 1
            table.blocks.append(block)
        return True

    def release(self, table: BlockTable) -> None:
        """Drops `table`'s references and empties it. Safe to call twice."""
        # Tail blocks first, so the LRU evicts a prefix's end before its start
        # (a start without its end still serves shorter prompts).
        for block in reversed(table.blocks):
            refs = self._refs[block] - 1
            if refs:
                self._refs[block] = refs
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        table.blocks.clear()
        table.hashes.clear()

    def _ref(self, block: int) -> None:
        refs = self._refs.get(block, 0)
        if refs == 0:
            self._evictable.pop(block, None)
        self._refs[block] = refs + 1
