"""A watch-driven, in-memory view of the registry.

List everything under the prefix at revision R, then watch from R+1. On
compaction, a broken watch, or etcd coming back after an outage, list again
and diff against what the view holds, so a deletion is never missed (not even
across an etcd wipe, where revisions start over). While etcd is away the
view keeps serving what it last saw and reports how stale it is.

Contract: `start()` once; `close()` safe twice. Readers (`get`, `entries`)
never block and never raise for etcd trouble. `changes()` subscribers each
get every change after they subscribed, in order. Malformed values are
skipped and logged (registry.records.from_kv), never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from registry.etcd_client import EtcdClient, EtcdUnavailable, EventType, KeyValue, WatchCompacted
from registry.keys import Keys, Kind
from registry.records import Entry, from_kv
from runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_MIN_BACKOFF = 0.1


@dataclass(frozen=True)
class Change:
    """One key's transition: `old` None means created, `new` None means deleted."""

    kind: Kind
    name: str
    old: Entry | None
    new: Entry | None


class RegistryView:
    def __init__(self, client: EtcdClient, keys: Keys, *, prefix: str = "",
                 probe_interval: float = 1.0, kinds: Iterable[Kind] | None = None) -> None:
        self.client = client
        self.keys = keys
        self.prefix = prefix or keys.root
        self.kinds = set(kinds) if kinds is not None else set(Kind)
        self.probe_interval = probe_interval
        self.revision = 0
        # Full re-lists after the first one (compactions, broken watches, outages).
        self.resyncs = 0
        self.synced = asyncio.Event()
        self._entries: dict[Kind, dict[str, Entry]] = {kind: {} for kind in Kind}
        self._subscribers: list[asyncio.Queue[Change]] = []
        self._last_contact = 0.0
        self._backoff = _MIN_BACKOFF
        self._closed = False
        self._runner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None

    # -- reading ----------------------------------------------------------------

    def get(self, kind: Kind, name: str) -> Entry | None:
        return self._entries[kind].get(name)

    def entries(self, kind: Kind) -> dict[str, Entry]:
        """name -> Entry for `kind` (a live dict: copy it to keep a snapshot)."""
        return self._entries[kind]

    def records(self, kind: Kind) -> list[Any]:
        return [entry.record for entry in self._entries[kind].values()]

    def staleness(self) -> float:
        """Seconds since etcd last answered, or 0 while it answers (within two probe intervals)."""
        if not self._last_contact:
            return float("inf")
        age = time.monotonic() - self._last_contact
        return 0.0 if self.synced.is_set() and age <= 2 * self.probe_interval else age

    async def changes(self) -> AsyncIterator[Change]:
        """Every change from now on, in order. Ends when the view closes."""
        queue = self._subscribe()
        try:
            while True:
                change = await queue.get()
                if change is _CLOSED:
                    return
                yield change
        finally:
            self._unsubscribe(queue)

    async def wait_synced(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.synced.wait()
            return True
        except TimeoutError:
            return False

    async def wait_for(self, predicate: Callable[[RegistryView], bool], timeout: float) -> bool:
        """Waits until `predicate(view)` is true (checked on every change); False after `timeout`."""
        deadline = time.monotonic() + timeout
        queue = self._subscribe()
        try:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Re-check at least every 0.2 s: staleness and similar change without events.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, 0.2)):
                        await queue.get()
            return True
        finally:
            self._unsubscribe(queue)

    def _subscribe(self) -> asyncio.Queue[Change]:
        queue: asyncio.Queue[Change] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def _unsubscribe(self, queue: asyncio.Queue[Change]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="registry-view")
            self._prober = asyncio.create_task(self._probe(), name="registry-view-probe")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._prober, self._watcher, self._runner)
        for queue in self._subscribers:
            queue.put_nowait(_CLOSED)

    # -- background -------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closed:
            self._watcher = asyncio.create_task(self._list_and_watch())
            try:
                await self._watcher
            except asyncio.CancelledError:
                if self._closed:
                    raise
                # The prober cancelled a watch that may have died silently.
            except WatchCompacted as exc:
                log.info("registry watch compacted; re-listing", extra={"error": str(exc)})
            except EtcdUnavailable as exc:
                # Once per outage at WARNING; the retries while etcd stays away are DEBUG.
                log.log(logging.WARNING if self._backoff == _MIN_BACKOFF else logging.DEBUG,
                        "registry watch lost; serving the last view", extra={"error": str(exc)})
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 1.0)

    async def _list_and_watch(self) -> None:
        revision, kvs = await self.client.get_prefix(self.prefix)
        self._touch()
        self._backoff = _MIN_BACKOFF
        if self.synced.is_set():
            self.resyncs += 1
        fresh: dict[Kind, dict[str, Entry]] = {kind: {} for kind in Kind}
        for kv in kvs:
            entry = self._decode(kv)
            if entry is not None:
                fresh[entry.kind][entry.name] = entry
        for kind in Kind:
            old, new = self._entries[kind], fresh[kind]
            for name in old.keys() - new.keys():
                self._apply(Change(kind, name, old[name], None))
            for name, entry in new.items():
                if old.get(name) != entry:
                    self._apply(Change(kind, name, old.get(name), entry))
        self.revision = revision
        self.synced.set()
        async for events in self.client.watch(self.prefix, revision + 1):
            self._touch()
            for event in events:
                ref = self.keys.parse(event.kv.key)
                if ref is None or ref.kind not in self.kinds:
                    continue
                old_entry = self._entries[ref.kind].get(ref.name)
                if event.type is EventType.DELETE:
                    if old_entry is not None:
                        self._apply(Change(ref.kind, ref.name, old_entry, None))
                else:
                    entry = self._decode(event.kv)
                    if entry is not None:
                        self._apply(Change(ref.kind, ref.name, old_entry, entry))
                    elif old_entry is not None:
                        # A valid value was overwritten by garbage: it no longer holds.
                        self._apply(Change(ref.kind, ref.name, old_entry, None))
                self.revision = max(self.revision, event.kv.mod_revision)
            del events  # not kept while the watch waits: a batch can be a whole revoked fleet

    async def _probe(self) -> None:
        was_down = False
        while not self._closed:
            try:
                await self.client.status()
                self._touch()
                if was_down and self._watcher is not None and not self._watcher.done():
                    # The watch may have died silently during the outage: re-list to be sure.
                    self._watcher.cancel()
                was_down = False
            except EtcdUnavailable:
                was_down = True
            await asyncio.sleep(self.probe_interval)

    def _decode(self, kv: KeyValue) -> Entry | None:
        ref = self.keys.parse(kv.key)
        if ref is None or ref.kind not in self.kinds:
            return None
        return from_kv(ref.kind, ref.name, kv.value, kv.mod_revision, kv.create_revision, kv.lease, key=kv.key)

    def _apply(self, change: Change) -> None:
        if change.new is None:
            self._entries[change.kind].pop(change.name, None)
        else:
            self._entries[change.kind][change.name] = change.new
        for queue in self._subscribers:
            queue.put_nowait(change)

    def _touch(self) -> None:
        self._last_contact = time.monotonic()


_CLOSED = Change(Kind.NODE, "", None, None)
