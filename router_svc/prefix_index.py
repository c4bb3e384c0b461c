"""The router's prefix index: which workers hold which KV blocks, from their events. Pure; no I/O.

Workers publish the block hashes their prefix cache stores and evicts
(runtime.prefix_hash; engine.kv_events) on their load stream. `KvIndex`
keeps, per (model, role, block size), block hash -> the workers holding it,
and answers "how many of this prompt's tokens does each worker hold?" with
a `CachedPrefix`.

Sync, per worker: a snapshot replaces what the index knew of it; a delta
applies only on top of the sequence number it follows (`since_seq` equal
to the last one applied). Anything else is a gap: `apply` returns False,
the caller resubscribes, and the new stream's first report is a snapshot.
Until then the worker's old entries stay: a stale index costs a mispriced
prefill, never a wrong answer (the engine checks its own cache).

Bounded: at most `max_entries` (worker, block) entries per index (about
120 bytes each, measured: a 2 M cap is about 240 MB). A store beyond the cap first
drops the oldest entry of the same worker (what its own LRU would have
evicted first), so every worker keeps a share and new prefixes are learned.

Lookup cost: one hash and one dict probe per prompt block, stopping at the
first block no worker of the model holds, plus big-integer ANDs over a bit
per worker (1000 workers: 16 machine words) — proportional to the prompt,
not the fleet. Not thread-safe: the router's event loop owns it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from runtime.prefix_hash import block_hashes, iter_block_hashes, prefix_blocks

DEFAULT_MAX_ENTRIES = 2_000_000


@dataclass(frozen=True)
class KvUpdate:
    """One report's events (tandem.v1.KvEvents as plain values)."""

    block_size: int
    since_seq: int
    last_seq: int
    stored: Sequence[int] = ()
    removed: Sequence[int] = ()
    snapshot: bool = False


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixIndex:
    """Block hash -> workers, for the workers of one model, role and block size."""

    def __init__(self, block_size: int, *, max_entries: int = DEFAULT_MAX_ENTRIES, prefill: bool = False) -> None:
        if block_size < 1 or max_entries < 1:
            raise ValueError(f"block_size and max_entries must be >= 1, got {block_size} and {max_entries}")
        self.block_size = block_size
        # Whose blocks: prefill workers' (True) or decode-capable workers'.
        self.prefill = prefill
        self.max_entries = max_entries
        self.entries = 0
        # Entries dropped to stay under max_entries (for metrics and tests).
        self.capped_total = 0
        self._holders: dict[int, int] = {}  # hash -> bit mask of worker slots
        self._held: dict[str, dict[int, None]] = {}  # worker -> its hashes, oldest first
        self._slot: dict[str, int] = {}
        self._ids: list[str] = []
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._held)

    def workers(self) -> list[str]:
        return sorted(self._held)

    def held(self, worker_id: str) -> set[int]:
        return set(self._held.get(worker_id, ()))

    def replace(self, worker_id: str, hashes: Iterable[int]) -> None:
        """What `worker_id` holds is exactly `hashes` (a snapshot)."""
        self.drop(worker_id)
        self.store(worker_id, hashes)

    def store(self, worker_id: str, hashes: Iterable[int]) -> None:
        held = self._held.get(worker_id)
        if held is None:
            held = self._held[worker_id] = {}
            slot = self._free.pop() if self._free else len(self._ids)
            if slot == len(self._ids):
                self._ids.append(worker_id)
            else:
                self._ids[slot] = worker_id
            self._slot[worker_id] = slot
        bit = 1 << self._slot[worker_id]
        holders = self._holders
        for h in hashes:
            if h in held:
                continue
            if self.entries >= self.max_entries:
                self.capped_total += 1
                if not held:
                    continue
                self._unhold(held, next(iter(held)), bit)
            held[h] = None
            holders[h] = holders.get(h, 0) | bit
            self.entries += 1

    def remove(self, worker_id: str, hashes: Iterable[int]) -> None:
        held = self._held.get(worker_id)
        if not held:
            return
        bit = 1 << self._slot[worker_id]
        for h in hashes:
            if h in held:
                self._unhold(held, h, bit)

    def drop(self, worker_id: str) -> None:
        """Forgets the worker (it left, or a snapshot follows). Cost: its entries."""
        held = self._held.pop(worker_id, None)
        if held is None:
            return
        slot = self._slot.pop(worker_id)
        keep = ~(1 << slot)
        holders = self._holders
        for h in held:
            mask = holders[h] & keep
            if mask:
                holders[h] = mask
            else:
                del holders[h]
        self.entries -= len(held)
        self._free.append(slot)

    def _unhold(self, held: dict[int, None], h: int, bit: int) -> None:
        del held[h]
        mask = self._holders[h] & ~bit
        if mask:
            self._holders[h] = mask
        else:
            del self._holders[h]
        self.entries -= 1


@dataclass(frozen=True)
class PrefixMatch:
    """Longest cached prefix of one prompt per worker, in tokens: `levels` are (tokens, bit mask of slots),
    longest first; `slots` names the bits. Valid for the decision it was looked up for."""

    levels: tuple[tuple[int, int], ...] = ()
    slots: Mapping[str, int] = field(default_factory=dict)
    ids: Sequence[str] = ()

    @classmethod
    def of(cls, tokens: Mapping[str, int]) -> PrefixMatch:
        """From plain values (tests; merging): worker id -> cached tokens."""
        ids = sorted(w for w, n in tokens.items() if n > 0)
        slots = {w: i for i, w in enumerate(ids)}
        levels: dict[int, int] = {}
        for w in ids:
            levels[tokens[w]] = levels.get(tokens[w], 0) | (1 << slots[w])
        return cls(tuple(sorted(levels.items(), reverse=True)), slots, ids)

    def tokens(self, worker_id: str) -> int:
        slot = self.slots.get(worker_id)
        if slot is None:
            return 0
        bit = 1 << slot
        for tokens, mask in self.levels:
            if mask & bit:
                return tokens
        return 0

    def best(self, limit: int, accept: Callable[[str], bool] = lambda w: True, *,
             scan: int = 64) -> list[tuple[str, int]]:
        """Up to `limit` accepted workers holding the most tokens, most first; looks at `scan` at most."""
        found: list[tuple[str, int]] = []
        for tokens, mask in self.levels:
            for slot in _bits(mask):
                scan -= 1
                worker_id = self.ids[slot]
                if accept(worker_id):
                    found.append((worker_id, tokens))
                    if len(found) >= limit:
                        return found
                if scan <= 0:
                    return found
        return found

    def as_dict(self) -> dict[str, int]:
        return {self.ids[slot]: tokens for tokens, mask in self.levels for slot in _bits(mask)}


_NO_MATCH = PrefixMatch()


@dataclass(frozen=True)
class CachedPrefix:
    """How much of one prompt each worker of its model holds: decode-capable and prefill workers apart."""

    decode: PrefixMatch = _NO_MATCH
    prefill: PrefixMatch = _NO_MATCH

    @classmethod
    def of(cls, decode: Mapping[str, int] | None = None, prefill: Mapping[str, int] | None = None) -> CachedPrefix:
        """From plain values: worker id -> cached prompt tokens."""
        return cls(PrefixMatch.of(decode or {}), PrefixMatch.of(prefill or {}))

    def tokens(self, worker_id: str) -> int:
        return max(self.decode.tokens(worker_id), self.prefill.tokens(worker_id))

    def best(self, limit: int, *, prefill: bool, accept: Callable[[str], bool] = lambda w: True
             ) -> list[tuple[str, int]]:
        return (self.prefill if prefill else self.decode).best(limit, accept)


NO_CACHED_PREFIX = CachedPrefix()


@dataclass
class _Sync:
    key: tuple[str, bool, int]
    # Last sequence number applied; None: out of sync until the next snapshot.
    last_seq: int | None


class KvIndex:
    """Every model's prefix indexes, and each worker's place in its event sequence."""

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._indexes: dict[tuple[str, bool, int], PrefixIndex] = {}
        self._by_model: dict[str, list[PrefixIndex]] = {}
        self._sync: dict[str, _Sync] = {}
        # Gaps detected (each led to a resubscription).
        self.gaps_total = 0

    def apply(self, worker_id: str, model: str, prefill: bool, update: KvUpdate | None, *,
              fresh: bool = False) -> bool:
        """Applies one report's events for a worker of `model` (`prefill`: a prefill worker).

        `update` None with `fresh` (a new stream's first report has no events: the
        engine publishes none) forgets the worker. Returns False on a gap: the
        caller should resubscribe to get a snapshot.
        """
        if update is None:
            if fresh:
                self.drop(worker_id)
            return True
        key = (model, prefill, update.block_size)
        sync = self._sync.get(worker_id)
        if update.snapshot:
            if sync is not None and sync.key != key:
                self.drop(worker_id)
            self._index(key).replace(worker_id, update.stored)
            self._sync[worker_id] = _Sync(key, update.last_seq)
            return True
        if sync is None or sync.key != key or sync.last_seq is None or sync.last_seq != update.since_seq:
            if sync is not None:
                sync.last_seq = None
            self.gaps_total += 1
            return False
        index = self._indexes[key]
        index.remove(worker_id, update.removed)
        index.store(worker_id, update.stored)
        sync.last_seq = update.last_seq
        return True

    def assume_stored(self, worker_id: str, tokens: Sequence[int]) -> None:
        """Provisionally adds the full blocks of `tokens` to a synced worker (a router that just sent it
        the prompt knows it will hold them before its events say so). Events confirm it; a snapshot
        replaces it; a worker not in sync is left alone."""
        sync = self._sync.get(worker_id)
        index = self._indexes.get(sync.key) if sync is not None and sync.last_seq is not None else None
        if index is not None:
            index.store(worker_id, block_hashes(tokens, index.block_size))

    def drop(self, worker_id: str) -> None:
        """Forgets a worker (it left the registry, or its engine publishes nothing)."""
        sync = self._sync.pop(worker_id, None)
        if sync is None:
            return
        index = self._indexes.get(sync.key)
        if index is None:
            return
        index.drop(worker_id)
        if not len(index):
            del self._indexes[sync.key]
            self._by_model[sync.key[0]].remove(index)
            if not self._by_model[sync.key[0]]:
                del self._by_model[sync.key[0]]

    def workers(self) -> list[str]:
        return sorted(self._sync)

    def synced(self, worker_id: str) -> bool:
        sync = self._sync.get(worker_id)
        return sync is not None and sync.last_seq is not None

    def synced_count(self) -> int:
        """Workers whose events this index follows in sequence now."""
        return sum(1 for sync in self._sync.values() if sync.last_seq is not None)

    def held(self, worker_id: str) -> set[int]:
        sync = self._sync.get(worker_id)
        index = self._indexes.get(sync.key) if sync is not None else None
        return index.held(worker_id) if index is not None else set()

    @property
    def entries(self) -> int:
        return sum(index.entries for index in self._indexes.values())

    def lookup(self, model: str, tokens: Sequence[int]) -> CachedPrefix:
        """How much of `tokens` each worker of `model` holds (never the last token: it is always computed)."""
        indexes = self._by_model.get(model)
        if not indexes:
            return NO_CACHED_PREFIX
        found: dict[bool, list[PrefixMatch]] = {False: [], True: []}
        for block_size in sorted({i.block_size for i in indexes}):
            group = [i for i in indexes if i.block_size == block_size]
            for index, match in _match(group, tokens, block_size):
                found[index.prefill].append(match)
        return CachedPrefix(_merge(found[False]), _merge(found[True]))

    def _index(self, key: tuple[str, bool, int]) -> PrefixIndex:
        index = self._indexes.get(key)
        if index is None:
            index = self._indexes[key] = PrefixIndex(key[2], max_entries=self.max_entries, prefill=key[1])
            self._by_model.setdefault(key[0], []).append(index)
        return index


def _match(keys: list[PrefixIndex], tokens: Sequence[int], block_size: int
           ) -> list[tuple[PrefixIndex, PrefixMatch]]:
    """Walks the prompt's blocks once for every index of one block size; stops when none holds the next.

    The matches refer to the indexes' slot tables (no copy: a lookup must not cost a pass over the
    fleet), so they are valid until the indexes next change: the decision they are for."""
    alive = [-1] * len(keys)
    levels: list[list[tuple[int, int]]] = [[] for _ in keys]
    depth = 0
    for h in iter_block_hashes(tokens, block_size, prefix_blocks(len(tokens), block_size)):
        any_alive = False
        for n, index in enumerate(keys):
            prev = alive[n]
            if not prev:
                continue
            cur = index._holders.get(h, 0) & prev
            dropped = prev & ~cur if prev != -1 else 0
            if dropped and depth:
                levels[n].append((depth * block_size, dropped))
            alive[n] = cur
            any_alive = any_alive or bool(cur)
        if not any_alive:
            break
        depth += 1
    else:
        for n in range(len(keys)):
            if alive[n] and alive[n] != -1 and depth:
                levels[n].append((depth * block_size, alive[n]))
    out = []
    for n, index in enumerate(keys):
        if levels[n]:
            levels[n].reverse()
            out.append((index, PrefixMatch(tuple(levels[n]), index._slot, index._ids)))
    return out


def _merge(matches: list[PrefixMatch]) -> PrefixMatch:
    if not matches:
        return _NO_MATCH
    if len(matches) == 1:
        return matches[0]
    merged: dict[str, int] = {}
    for match in matches:
        for worker_id, tokens in match.as_dict().items():
            merged[worker_id] = max(merged.get(worker_id, 0), tokens)
    return PrefixMatch.of(merged)
