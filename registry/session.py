"""A lease session: one etcd lease per process, and every key bound to it.

Modelled on etcd's client/v3/concurrency Session. The session grants a lease,
keeps it alive every TTL/3 in a background task, and remembers every key the
process wrote under it. When the lease is lost (etcd restarted from scratch
or wiped, or unreachable for longer than the TTL), it grants a new lease as
soon as etcd answers and writes every bound key again, so a process never
needs a restart to rejoin, and nothing is duplicated (keys are rewritten in
place, claims re-created only where free). A bound key deleted while the
lease lives (`etcdctl del`, a wrong cleanup script) is re-created at the next
keepalive, within TTL/3: each keepalive asks etcd which keys the lease holds
(one TimeToLive call) and re-creates the missing ones where still free.

Contract:
- `start()` is called once; it does not wait for etcd (a service must come up
  even while etcd is down). `wait_alive()` waits for the first lease.
- `put()`, `claim()` and `delete()` may run concurrently with the background
  task. A write that fails because etcd is away is retried by the task.
- `close()` revokes the lease (its keys vanish at once) with a timeout no
  longer than the TTL ("if revoke takes longer than the ttl, the lease is
  expired anyway"). Safe to call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from registry.etcd_client import EtcdClient, EtcdUnavailable, KeyValue
from runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_TTL = 5


class ClaimConflict(Exception):
    """Keys of a claim are held by someone else. `holders` maps key -> current value."""

    def __init__(self, holders: dict[str, KeyValue]) -> None:
        self.holders = holders
        super().__init__("already held: " + ", ".join(sorted(holders)))


class LeaseSession:
    def __init__(self, client: EtcdClient, ttl: int = DEFAULT_TTL, name: str = "",
                 on_claim_lost: Callable[[dict[str, KeyValue]], None] | None = None) -> None:
        if ttl < 2:
            raise ValueError(f"lease TTL must be at least 2 s, got {ttl}")
        self.client = client
        self.ttl = ttl
        self.name = name
        self.lease_id = 0
        # Leases granted after the first one (each a recovery from a lost lease).
        self.regrants = 0
        self._bound: dict[str, bytes] = {}
        self._claims: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._lock = asyncio.Lock()
        self._alive = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._outage_since: float | None = None
        self._on_claim_lost = on_claim_lost
        self._granted_once = False

    @property
    def alive(self) -> bool:
        """True while the session holds a lease etcd has confirmed within the TTL."""
        return self._alive.is_set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name=f"lease-session-{self.name}")

    async def wait_alive(self, timeout: float) -> bool:
        """Waits until the session holds a lease; False after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._alive.wait()
            return True
        except TimeoutError:
            return False

    async def put(self, key: str, value: bytes) -> bool:
        """Binds `key` to the lease with `value` and writes it now if possible.

        Returns False when etcd is away; the write then happens as soon as it
        answers again.
        """
        async with self._lock:
            self._bound[key] = value
            if not self.lease_id:
                self._dirty.add(key)
                return False
            try:
                await self.client.put(key, value, lease=self.lease_id)
                self._dirty.discard(key)
                return True
            except EtcdUnavailable as exc:
                self._dirty.add(key)
                log.warning("registry write deferred until etcd answers", extra={"key": key, "error": str(exc)})
                self._wake.set()
                return False

    async def claim(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Creates all `items` under the lease only if none exists (one transaction).

        Raises ClaimConflict naming the holders, or EtcdUnavailable. Claimed
        keys are re-created after a lease loss, where still free.
        """
        async with self._lock:
            if not self.lease_id:
                raise EtcdUnavailable(f"no lease yet (etcd at {self.client.settings.describe()} not answering)")
            mine = {k: v for k, v in items if self._claims.get(k) == v}
            fresh = [(k, v) for k, v in items if k not in mine]
            if fresh:
                conflicts = await self.client.create_all(fresh, lease=self.lease_id)
                conflicts = {k: kv for k, kv in conflicts.items() if kv.lease != self.lease_id}
                if conflicts:
                    raise ClaimConflict(conflicts)
            self._claims.update(dict(items))

    async def delete(self, key: str) -> None:
        """Unbinds `key` and deletes it from etcd (best effort when etcd is away)."""
        async with self._lock:
            self._bound.pop(key, None)
            self._claims.pop(key, None)
            self._dirty.discard(key)
            with contextlib.suppress(EtcdUnavailable):
                await self.client.delete(key)

    async def close(self) -> None:
        """Stops keepalives and revokes the lease. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._task)
        if self.lease_id:
            try:
                await self.client.revoke(self.lease_id, timeout=min(self.ttl, 2.0))
            except EtcdUnavailable as exc:
                log.warning("lease not revoked; it expires within its TTL", extra={"error": str(exc)})
        self.lease_id = 0
        self._alive.clear()

    # -- background -------------------------------------------------------------

    async def _maintain(self) -> None:
        interval = self.ttl / 3
        while not self._closed:
            try:
                if not self.lease_id:
                    await self._grant_and_restore()
                else:
                    remaining = await self.client.keepalive(self.lease_id)
                    if remaining <= 0:
                        log.warning("lease lost; granting a new one", extra={"lease": f"{self.lease_id:x}"})
                        self._alive.clear()
                        async with self._lock:
                            self.lease_id = 0
                        continue
                    self._alive.set()
                    await self._flush_dirty()
                    await self._heal()
                self._end_outage()
                delay = interval
            except EtcdUnavailable as exc:
                self._note_outage(exc)
                # Retry quickly while etcd is away so recovery follows its return closely.
                delay = min(interval, 0.5)
            except Exception:
                log.exception("lease session step failed")
                delay = min(interval, 0.5)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _grant_and_restore(self) -> None:
        async with self._lock:
            lease_id, _ = await self.client.grant(self.ttl)
            self.lease_id = lease_id
            try:
                for key, value in self._bound.items():
                    await self.client.put(key, value, lease=lease_id)
                self._dirty.clear()
                await self._reclaim()
            except EtcdUnavailable:
                # Start over with a fresh lease next time; this one expires on its own.
                self.lease_id = 0
                raise
            if self._granted_once:
                self.regrants += 1
                log.info("re-registered with a new lease",
                         extra={"lease": f"{lease_id:x}", "keys": len(self._bound) + len(self._claims)})
            self._granted_once = True
            self._alive.set()

    async def _reclaim(self) -> None:
        if not self._claims:
            return
        conflicts = await self.client.create_all(list(self._claims.items()), lease=self.lease_id)
        if not conflicts:
            return
        # Someone took a claim while we were away: claim what is still free, report the rest.
        lost = {k: kv for k, kv in conflicts.items() if kv.lease != self.lease_id}
        for key in lost:
            self._claims.pop(key, None)
        free = [(k, v) for k, v in self._claims.items() if k not in conflicts]
        if free:
            await self.client.create_all(free, lease=self.lease_id)
        if lost:
            log.error("claims taken by others while the lease was lost", extra={"keys": ",".join(sorted(lost))})
            if self._on_claim_lost is not None:
                self._on_claim_lost(lost)

    async def _flush_dirty(self) -> None:
        if not self._dirty:
            return
        async with self._lock:
            for key in sorted(self._dirty):
                if key in self._bound:
                    await self.client.put(key, self._bound[key], lease=self.lease_id)
                self._dirty.discard(key)

    async def _heal(self) -> None:
        """Re-creates bound keys and claims that vanished while the lease lived, where still free."""
        if not self._bound and not self._claims:
            return
        _, remaining, keys = await self.client.lease_info(self.lease_id)
        if remaining <= 0:
            return  # the next keepalive sees the lease gone and re-grants
        held = set(keys)
        async with self._lock:
            lease_id = self.lease_id
            missing = [(k, v) for k, v in {**self._bound, **self._claims}.items()
                       if k not in held and k not in self._dirty]
            lost = {}
            for key, value in missing:
                # Create only where absent: a put() since the read above, or another holder, is left alone.
                conflicts = await self.client.create_all([(key, value)], lease=lease_id)
                if not conflicts:
                    log.warning("registry key was deleted while its lease lived; restored it",
                                extra={"key": key, "lease": f"{lease_id:x}"})
                elif key in self._claims and conflicts[key].lease != lease_id:
                    lost[key] = conflicts[key]
                    self._claims.pop(key, None)
        if lost:
            log.error("claims deleted and taken by others", extra={"keys": ",".join(sorted(lost))})
            if self._on_claim_lost is not None:
                self._on_claim_lost(lost)

    def _note_outage(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            log.warning("etcd unreachable; serving on, will re-register when it answers",
                        extra={"error": str(exc)})
        if now - self._outage_since > self.ttl:
            self._alive.clear()

    def _end_outage(self) -> None:
        if self._outage_since is not None:
            log.info("etcd reachable again", extra={"outage_s": round(time.monotonic() - self._outage_since, 2)})
            self._outage_since = None
