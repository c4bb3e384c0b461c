"""Control-plane leader election on etcd, in the style of etcd's concurrency package.

Each replica campaigns with its one LeaseSession: it creates
`{prefix}/v1/election/controlplane/{lease}` holding a LeaderRecord, in one
transaction on `create_revision == 0`, bound to its lease. The leader is the
candidacy with the lowest create_revision. Followers learn of changes through
the replica's RegistryView, so when the leader's key disappears (lease expiry
after a crash, revoke on a clean stop) the next candidate leads at once.

Leadership is fenced by the lease: whatever the leader writes as leader (the
prober's verdicts) goes under `Election.lease`. A replica whose lease is gone
can no longer write those keys (etcd refuses an unknown lease), and while its
lease lives no other candidacy can have a lower create_revision.

After a lost lease (the session grants a new one), the replica campaigns
again with the new lease's key; it leads again only if no older candidacy
remains.

Contract: `start()` once; `close()` resigns (deletes the key at once) and is
safe to call twice. `is_leader` and `lease` may be read at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from registry.etcd_client import EtcdClient, EtcdUnavailable
from registry.keys import Keys, Kind
from registry.records import Entry, encode, now_ms
from registry.session import LeaseSession
from registry.view import RegistryView
from runtime.tasks import cancel_and_wait
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)


def leader_entry(candidates: Iterable[Entry]) -> Entry | None:
    """The election winner: the candidacy with the lowest create_revision (ties by name)."""
    return min(candidates, key=lambda e: (e.create_revision, e.name), default=None)


class Election:
    def __init__(self, client: EtcdClient, keys: Keys, session: LeaseSession, view: RegistryView, *,
                 replica_id: str, endpoint: str, poll_interval: float = 0.25,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.client = client
        self.keys = keys
        self.session = session
        self.view = view
        self.replica_id = replica_id
        self.endpoint = endpoint
        # Re-check this often even without a view event (session lease changes have none).
        self.poll_interval = poll_interval
        self.is_leader = False
        # Lease the leadership is bound to; 0 while not leading.
        self.lease = 0
        # Times this replica became leader.
        self.terms = 0
        self._on_change = on_change
        self._campaign_lease = 0
        self._changed = asyncio.Event()
        self._poke = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._warned = False

    def leader(self) -> registry_pb2.LeaderRecord | None:
        """The current leader as this replica's view sees it, or None."""
        entry = leader_entry(self.view.entries(Kind.ELECTION).values())
        return entry.record if entry is not None else None

    def fence(self) -> tuple[str, int] | None:
        """(election key, its create_revision) while leading, for EtcdClient.put_all_if_created; None
        otherwise. A write guarded by it lands only while this candidacy still exists: the lowest
        candidacy leads and a newer one never gets lower, so the candidacy alive means leadership."""
        if not self.is_leader or not self.lease:
            return None
        entry = self.view.get(Kind.ELECTION, f"{self.lease:016x}")
        if entry is None:
            return None
        return self.keys.election(self.lease), entry.create_revision

    def start(self) -> None:
        if self._task is None:
            self._watcher = asyncio.create_task(self._watch_view(), name="election-watch")
            self._task = asyncio.create_task(self._run(), name="election")

    async def wait_change(self, timeout: float) -> bool:
        """Waits until leadership changes (either way); False after `timeout`."""
        event = self._changed
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stops campaigning and resigns. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(self._task, self._watcher)
        self._set_leader(False, "replica stopping")
        if self._campaign_lease:
            with contextlib.suppress(EtcdUnavailable):
                await self.client.delete(self.keys.election(self._campaign_lease))
            self._campaign_lease = 0

    # -- background -------------------------------------------------------------

    async def _watch_view(self) -> None:
        async for change in self.view.changes():
            if change.kind is Kind.ELECTION:
                self._poke.set()

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._campaign()
                self._warned = False
            except EtcdUnavailable as exc:
                if not self._warned:
                    log.warning("cannot campaign for leadership; retrying", extra={"error": str(exc)})
                    self._warned = True
            await self._decide()
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._poke.wait()

    async def _campaign(self) -> None:
        """Creates this replica's candidacy for the session's current lease, once per lease."""
        lease = self.session.lease_id
        if not lease or not self.session.alive or lease == self._campaign_lease:
            return
        record = registry_pb2.LeaderRecord(replica_id=self.replica_id, endpoint=self.endpoint,
                                           since_unix_ms=now_ms())
        # A conflict can only be our own key (the name is our lease): nothing to do then.
        await self.client.create_all([(self.keys.election(lease), encode(record))], lease=lease)
        if self._campaign_lease:
            log.info("campaigning again with a new lease", extra={"lease": f"{lease:x}"})
        self._campaign_lease = lease

    async def _decide(self) -> None:
        lease = self._campaign_lease
        winner = leader_entry(self.view.entries(Kind.ELECTION).values())
        leading = bool(
            lease
            and winner is not None
            and winner.name == f"{lease:016x}"
            and winner.lease == lease
            and self.session.alive
            and self.session.lease_id == lease
        )
        if leading and not self.is_leader:
            # `since` becomes the start of this term; the put keeps the key's create_revision.
            record = registry_pb2.LeaderRecord(replica_id=self.replica_id, endpoint=self.endpoint,
                                               since_unix_ms=now_ms())
            with contextlib.suppress(EtcdUnavailable):
                await self.client.put(self.keys.election(lease), encode(record), lease=lease)
            self.lease = lease
            self.terms += 1
            self._set_leader(True, "lowest candidacy")
        elif not leading and self.is_leader:
            lost = self.session.lease_id != lease or not self.session.alive
            self._set_leader(False, "lease lost" if lost else "another candidacy leads")

    def _set_leader(self, leading: bool, why: str) -> None:
        if leading == self.is_leader:
            return
        log.info("leading the control plane" if leading else "no longer leading the control plane",
                 extra={"replica_id": self.replica_id, "reason": why, "lease": f"{self.lease:x}"})
        self.is_leader = leading
        if not leading:
            self.lease = 0
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            self._on_change(leading)
