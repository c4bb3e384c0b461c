"""vLLM's prefix-cache events -> Tandem's block hashes, in order. Pure; no vLLM import, no I/O.

vLLM's engine core numbers its event batches 0, 1, ... and names blocks by
its own hashes (salted SHA-256 over its own chain), which no router can
compute. Each `BlockStored` carries the blocks' token ids and the vLLM hash
of the block before the first one (None: the first block of a prompt), so
the Tandem hash (runtime.prefix_hash, the one routers look up) is
recomputed here: `chain(tandem(parent), block tokens)`, block by block.
`VllmPrefixEvents.log` (engine.kv_events) then holds exactly the Tandem
hashes of the blocks vLLM can serve from its cache.

Kept per vLLM hash: its Tandem hash and how many of vLLM's blocks carry it
(vLLM does not deduplicate: two requests computing one prefix at once each
cache a block under the same hash, and each block is removed on its own);
the Tandem hash leaves the log when the last one goes.

What is not translated (never published, so routers price it as uncached):
a block whose parent is unknown (its chain was lost in a gap, or was not
translated), blocks of another size than the log's, and blocks hashed with
extra keys (a LoRA, a cache salt, multimodal input): their Tandem hash
would name a prefix the engine does not serve to plain token prompts.

Order and losses (`accept`): batches apply in sequence order, each once.
A batch ahead of the next expected one is a gap: `accept` refuses it, and
the caller fetches the missing batches (vLLM's replay socket) or, when they
are gone, calls `skip_to`, which forgets everything (the engine still holds
those blocks; routers only miss them until they are stored again). A new
publisher (a restarted engine core) numbers from 0 again and starts with
an empty cache: `restarted()` forgets everything. The caller says so when it
knows (its connection to the publisher was made anew); without that, a live
number at or below the last live one (live batches of one publisher come in
increasing order) is taken for a restart too.

Not thread-safe: the engine's event loop owns it, as it owns the log.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from engine.kv_events import DEFAULT_CAPACITY, KvEventLog
from runtime.prefix_hash import ROOT_HASH, chain


@dataclass(frozen=True)
class Stored:
    """vLLM's BlockStored: `block_hashes[i]` holds `token_ids[i * block_size: (i + 1) * block_size]`."""

    block_hashes: Sequence[Hashable]
    parent: Hashable | None
    token_ids: Sequence[int]
    block_size: int
    extra_keys: bool = False


@dataclass(frozen=True)
class Removed:
    """vLLM's BlockRemoved: one cached block under each of these hashes was evicted."""

    block_hashes: Sequence[Hashable]


@dataclass(frozen=True)
class Cleared:
    """vLLM's AllBlocksCleared: the whole prefix cache was reset."""


Event = Stored | Removed | Cleared


class VllmPrefixEvents:
    """One vLLM engine core's events, translated into `log` (see the module docstring)."""

    def __init__(self, block_size: int, *, capacity: int = DEFAULT_CAPACITY) -> None:
        # Tandem hash -> vLLM blocks holding it; insertion order is store order (snapshots keep the newest).
        self._held: dict[int, int] = {}
        # vLLM hash -> [Tandem hash, vLLM blocks holding it].
        self._blocks: dict[Hashable, list[int]] = {}
        self.log = KvEventLog(block_size, self._held.keys, capacity=capacity)
        # Sequence number of the next batch to apply, and of the last batch that arrived live (-1: none).
        self.next_seq = 0
        self._last_live = -1
        self.untranslated_blocks = 0

    @property
    def block_size(self) -> int:
        return self.log.block_size

    # -- batches, in order ------------------------------------------------------------------------

    def accept(self, seq: int, events: Iterable[Event], *, replayed: bool = False) -> bool:
        """Applies batch `seq` if it is the next one; False (nothing applied) when batches before it are missing.

        A batch applied already (a replay overlapping the live stream) is
        ignored. `replayed`: the batch came from a replay, not live.
        """
        if not replayed and seq <= self._last_live:
            self.restarted()
        if seq > self.next_seq:
            return False
        if seq == self.next_seq:
            for event in events:
                self.apply(event)
            self.next_seq = seq + 1
        if not replayed:
            self._last_live = seq
        return True

    def restarted(self) -> None:
        """A new publisher (a restarted engine core): its numbering and its cache start over."""
        self.clear()
        self.next_seq = 0
        self._last_live = -1

    def skip_to(self, seq: int) -> None:
        """The batches before `seq` cannot be had: forgets every block, then expects `seq`."""
        self.clear()
        self.next_seq = seq

    # -- events -----------------------------------------------------------------------------------

    def apply(self, event: Event) -> None:
        if isinstance(event, Stored):
            self.stored(event)
        elif isinstance(event, Removed):
            self.removed(event.block_hashes)
        else:
            self.clear()

    def stored(self, event: Stored) -> None:
        count = len(event.block_hashes)
        parent = ROOT_HASH if event.parent is None else self._tandem_hash(event.parent)
        if (parent is None or event.extra_keys or event.block_size != self.block_size
                or len(event.token_ids) != count * self.block_size):
            self.untranslated_blocks += count
            return
        size = self.block_size
        for i, vllm_hash in enumerate(event.block_hashes):
            entry = self._blocks.get(vllm_hash)
            if entry is None:
                parent = chain(parent, event.token_ids[i * size:(i + 1) * size])
                self._blocks[vllm_hash] = [parent, 1]
            else:
                parent = entry[0]
                entry[1] += 1
            refs = self._held.get(parent, 0)
            self._held[parent] = refs + 1
            if refs == 0:
                self.log.stored(parent)

    def removed(self, block_hashes: Iterable[Hashable]) -> None:
        for vllm_hash in block_hashes:
            entry = self._blocks.get(vllm_hash)
            if entry is None:
                continue  # never translated
            tandem, refs = entry
            if refs > 1:
                entry[1] = refs - 1
            else:
                del self._blocks[vllm_hash]
            held = self._held[tandem] - 1
            if held:
                self._held[tandem] = held
            else:
                del self._held[tandem]
                self.log.removed(tandem)

    def clear(self) -> None:
        """Every block leaves the cache (AllBlocksCleared, a restart, a lost gap)."""
        for tandem in list(self._held):
            self.log.removed(tandem)
        self._held.clear()
        self._blocks.clear()

    def held(self) -> list[int]:
        """The Tandem hashes held now, oldest stored first."""
        return list(self._held)

    def _tandem_hash(self, vllm_hash: Hashable) -> int | None:
        entry = self._blocks.get(vllm_hash)
        return None if entry is None else entry[0]
