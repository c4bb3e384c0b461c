"""The producer's store of exported KV payloads, each under a handle id with a time to live.

Contract:
- `put` keeps a payload until `release(handle_id)` or its TTL passes; expired
  handles are invisible to `get` at once (lazy expiry) and their resources
  are freed by the next `sweep()` or `get`/`release` of that id.
- `release` is idempotent; every entry's `on_release` runs exactly once
  (release, expiry or `close`), so a shared-memory segment is unlinked once.
- Time comes from an injected clock (monotonic seconds), so tests drive
  expiry without sleeping.
- Bounded: at most `max_handles` entries and `max_bytes` payload bytes. A
  `put` that would pass either cap first frees expired entries, then raises
  `StoreFull` (with `retry_after_s`: when the soonest handle expires) and
  keeps nothing; the caller answers RESOURCE_EXHAUSTED. `check_room()` lets a
  caller refuse before computing a payload it could not keep.
- Not thread-safe by design: one event loop owns a store (the prefill
  service's); callers on other threads hop onto that loop.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.base import KvBlob, KvLayoutSpec

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class StoreFull(Exception):
    """No room for one more handle; `retry_after_s` is when the soonest one expires (or is released sooner)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class KvEntry:
    """One exported payload. `payload` is what transports read; `params` go into the handle."""

    handle_id: str
    layout: KvLayoutSpec
    num_tokens: int
    payload: memoryview
    expires_at: float
    transport: str = "grpc"
    params: dict[str, str] = field(default_factory=dict)
    crc32c: int = 0
    on_release: Callable[[], None] | None = None


class HandleStore:
    """Handles -> KV payloads with TTL. See the module docstring for the guarantees."""

    def __init__(self, *, clock: Clock = time.monotonic, default_ttl_s: float = 30.0,
                 max_handles: int = 1024, max_bytes: int = 8 << 30) -> None:
        if default_ttl_s <= 0:
            raise ValueError(f"default_ttl_s must be > 0, got {default_ttl_s}")
        if max_handles < 1 or max_bytes < 1:
            raise ValueError(f"max_handles and max_bytes must be >= 1, got {max_handles} and {max_bytes}")
        self._clock = clock
        self.default_ttl_s = default_ttl_s
        self.max_handles = max_handles
        self.max_bytes = max_bytes
        self._entries: dict[str, KvEntry] = {}
        self._nbytes = 0
        self.released_total = 0
        self.expired_total = 0
        self.refused_total = 0

    def check_room(self, nbytes: int = 0) -> None:
        """Raises StoreFull unless one more handle of `nbytes` fits (after freeing expired ones)."""
        if len(self._entries) < self.max_handles and self._nbytes + nbytes <= self.max_bytes:
            return
        self.sweep()
        if len(self._entries) >= self.max_handles:
            what = f"{len(self._entries)} open KV handles (limit {self.max_handles})"
        elif self._nbytes + nbytes > self.max_bytes:
            what = f"{self._nbytes} bytes under open KV handles, {nbytes} more asked (limit {self.max_bytes})"
        else:
            return
        self.refused_total += 1
        retry = self._soonest_expiry()
        raise StoreFull(f"{what}; they free as decode workers pull them or their TTL passes; "
                        f"retry after {retry:.2f}s or on another worker", retry)

    def _soonest_expiry(self) -> float:
        now = self._clock()
        soonest = min((e.expires_at for e in self._entries.values()), default=now)
        return max(0.05, soonest - now)

    def put(self, blob: KvBlob, ttl_s: float | None = None, *, transport: str = "grpc") -> KvEntry:
        """Stores `blob` under a new unguessable handle id; returns its entry (id in `entry.handle_id`).

        Raises StoreFull (keeping nothing) when either cap would be passed.
        """
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl}")
        payload = memoryview(blob.data).cast("B") if not isinstance(blob.data, memoryview) else blob.data.cast("B")
        self.check_room(payload.nbytes)
        entry = KvEntry(secrets.token_hex(12), blob.layout, blob.num_tokens, payload, self._clock() + ttl, transport)
        self._entries[entry.handle_id] = entry
        self._nbytes += payload.nbytes
        return entry

    def get(self, handle_id: str) -> KvEntry | None:
        """The live entry, or None when unknown, released or expired."""
        entry = self._entries.get(handle_id)
        if entry is not None and entry.expires_at <= self._clock():
            self._drop(entry, expired=True)
            return None
        return entry

    def release(self, handle_id: str) -> bool:
        """Frees the handle now; False when it was already gone (or had expired). Idempotent."""
        entry = self._entries.get(handle_id)
        if entry is None:
            return False
        expired = entry.expires_at <= self._clock()
        self._drop(entry, expired=expired)
        return not expired

    def sweep(self) -> int:
        """Frees every expired handle; returns how many."""
        now = self._clock()
        expired = [e for e in self._entries.values() if e.expires_at <= now]
        for entry in expired:
            self._drop(entry, expired=True)
        return len(expired)

    def close(self) -> None:
        """Frees every handle. Safe twice."""
        for entry in list(self._entries.values()):
            self._drop(entry, expired=False)

    def seconds_left(self, entry: KvEntry) -> float:
        return entry.expires_at - self._clock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def _drop(self, entry: KvEntry, *, expired: bool) -> None:
        if self._entries.pop(entry.handle_id, None) is None:
            return
        self._nbytes -= entry.payload.nbytes
        if expired:
            self.expired_total += 1
            log.info("KV handle %s expired unreleased (%d bytes)", entry.handle_id, entry.payload.nbytes)
        else:
            self.released_total += 1
        callback, entry.on_release = entry.on_release, None
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("freeing KV handle %s failed", entry.handle_id)
