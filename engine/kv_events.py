"""An engine's prefix-cache events: which block hashes it stored and evicted, numbered. Pure; no I/O.

An engine with a prefix cache (the sim engine; vLLM through its KV events)
calls `stored(h)` when a full block with hash `h` (runtime.prefix_hash)
becomes reusable and `removed(h)` when it is evicted. Each call is one
event with the next sequence number (1, 2, ...; 0 before the first).

Readers (the worker's WatchLoad streams, one per router) ask for what
happened after the last sequence number they saw:

- `delta_since(seq)`: the net change since `seq` (a hash stored then
  removed in the same window appears once, as removed), or None when the
  log no longer reaches back that far (it keeps the last `capacity`
  events): the reader then takes a `snapshot()`;
- `snapshot()`: every hash held now, as of the latest sequence number.

Bounded: `capacity` events (about 40 bytes each) whatever the number of
readers; a reader never holds events back. Not thread-safe: the engine's
event loop owns it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from itertools import islice

DEFAULT_CAPACITY = 65536


@dataclass(frozen=True)
class KvDelta:
    """What changed in (`since_seq`, `last_seq`]; with `snapshot`, `stored` is everything held at `last_seq`."""

    block_size: int
    since_seq: int
    last_seq: int
    stored: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    snapshot: bool = False

    @property
    def empty(self) -> bool:
        return not (self.snapshot or self.stored or self.removed)


class KvEventLog:
    """The last `capacity` events of one engine; `held()` lists the hashes it holds now (for snapshots)."""

    def __init__(self, block_size: int, held: Callable[[], Collection[int]], *,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1 or block_size < 1:
            raise ValueError(f"capacity and block_size must be >= 1, got {capacity} and {block_size}")
        self.block_size = block_size
        self.held = held
        self.capacity = capacity
        # Sequence number of the latest event (0: none yet).
        self.seq = 0
        self._events: deque[tuple[int, bool]] = deque(maxlen=capacity)

    def stored(self, block_hash: int) -> None:
        self.seq += 1
        self._events.append((block_hash, True))

    def removed(self, block_hash: int) -> None:
        self.seq += 1
        self._events.append((block_hash, False))

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest event kept (seq + 1 when none is kept)."""
        return self.seq - len(self._events) + 1

    def delta_since(self, since: int) -> KvDelta | None:
        """The net change after `since`; None when events after it were dropped (take a snapshot)."""
        if since > self.seq or since < self.first_seq - 1:
            return None
        net: dict[int, bool] = {}
        for block_hash, stored in islice(self._events, since - self.first_seq + 1, None):
            net.pop(block_hash, None)  # keep the last event's place, so replaying the net change keeps order
            net[block_hash] = stored
        return KvDelta(
            block_size=self.block_size, since_seq=since, last_seq=self.seq,
            stored=tuple(h for h, s in net.items() if s), removed=tuple(h for h, s in net.items() if not s))

    def snapshot(self, limit: int | None = None) -> KvDelta:
        """Every hash held now, or the last `limit` of them in `held()`'s order (the most recently stored,
        for a cache that lists them oldest first): a reader that knows part of a cache only misprices."""
        held = tuple(self.held())
        if limit is not None and len(held) > limit:
            held = held[len(held) - limit:]
        return KvDelta(block_size=self.block_size, since_seq=self.seq, last_seq=self.seq, stored=held,
                       snapshot=True)
