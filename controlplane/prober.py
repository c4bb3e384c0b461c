"""The leader's health prober: grpc.health.v1 checks of every worker, verdicts into etcd.

Runs on every replica and works only while its replica leads. Each round
(every `interval` seconds) it checks every READY or DRAINING worker in the
view, concurrently (at most `concurrency` at once, each bounded by
`timeout`), over one reused channel per endpoint; it feeds the results and
the GPUs' NVML health to the pure policy (controlplane.health_policy) and
writes a HealthVerdict only when one changes, plus the first one of each
term, so etcd sees a handful of writes per incident, not one per probe.

Verdicts are bound to the leader's lease (`Election.lease`): a dead leader's
verdicts vanish with it, and a replica that lost its lease cannot write any.
While following, the prober remembers the verdicts it sees; on taking over
it starts each worker from the last verdict (so a NOT_SERVING worker must
earn its way back) and rewrites the NOT_SERVING ones at once, before its
first round, so routers lose them only between the old lease's end and the
new leader's first writes.

Contract: `start()` once; `close()` safe twice. `run_round()` may be called
directly by a test while leading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.fleet import gpu_index, gpu_problem
from controlplane.health_policy import HealthTracker, Thresholds, Transition, WorkerHealth
from registry.election import Election
from registry.etcd_client import EtcdClient, EtcdUnavailable
from registry.keys import Keys, Kind
from registry.records import encode
from registry.routable import Health
from registry.routable_pb import health_from_pb, health_to_pb
from registry.view import RegistryView
from runtime.peers import PeerTls, peer_identity
from runtime.tasks import cancel_and_wait
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)

_PROBED_STATES = (registry_pb2.WORKER_STATE_READY, registry_pb2.WORKER_STATE_DRAINING)


@dataclass(frozen=True)
class _Written:
    status: Health
    reason: str
    revision: int


class Prober:
    def __init__(self, client: EtcdClient, keys: Keys, view: RegistryView, election: Election, *,
                 replica_id: str, interval: float = 2.0, timeout: float = 1.0,
                 thresholds: Thresholds | None = None, concurrency: int = 64,
                 peer_tls: PeerTls | None = None,
                 on_probe: Callable[[float], None] | None = None,
                 on_verdict: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.keys = keys
        self.view = view
        self.election = election
        self.replica_id = replica_id
        self.interval = interval
        self.timeout = timeout
        self.tracker = HealthTracker(thresholds)
        self.rounds = 0
        self._limit = asyncio.Semaphore(concurrency)
        self._on_probe = on_probe
        self._on_verdict = on_verdict
        self._clock = clock
        # By (endpoint, identity): with identity checks on, a probe verifies that the worker's certificate
        # names the record probed, so a record forged to point at someone else's server is NOT_SERVING.
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._peer_tls = peer_tls
        self._credentials = peer_tls.credentials() if peer_tls is not None else None
        self._endpoints: dict[str, str] = {}
        self._written: dict[str, _Written] = {}
        # Verdicts seen in the view (any writer), kept after their key vanishes: the
        # previous leader's last word when this replica takes over.
        self._seen: dict[str, registry_pb2.HealthVerdict] = {}
        self._term_lease = 0
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._remember_verdicts(), name="prober-verdicts"),
                           asyncio.create_task(self._run(), name="prober")]

    async def close(self) -> None:
        """Stops probing and closes the channels. Verdicts stay until the lease ends. Safe twice."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait(*self._tasks)
        await self._close_channels(set(self._channels))

    # -- loop -------------------------------------------------------------------

    async def _remember_verdicts(self) -> None:
        for name, entry in list(self.view.entries(Kind.HEALTH).items()):
            self._seen[name] = entry.record
        async for change in self.view.changes():
            if change.kind is Kind.HEALTH and change.new is not None:
                self._seen[change.name] = change.new.record

    async def _run(self) -> None:
        while not self._closed:
            delay = self.interval
            if self.election.is_leader:
                started = time.monotonic()
                try:
                    lease = self.election.lease
                    if lease != self._term_lease:
                        await self._begin_term(lease)
                    await self.run_round()
                except Exception:
                    log.exception("probe round failed")
                delay = max(0.0, self.interval - (time.monotonic() - started))
            elif self._term_lease:
                self._end_term()
            await self.election.wait_change(delay)

    async def _begin_term(self, lease: int) -> None:
        self._term_lease = lease
        self.tracker.clear()
        self._written.clear()
        self._endpoints.clear()
        now = self._clock()
        workers = self.view.entries(Kind.WORKER)
        inherited = []
        for worker_id, verdict in self._seen.items():
            status = health_from_pb(verdict)
            if status is Health.UNKNOWN or worker_id not in workers:
                continue
            self.tracker.seed(worker_id, status, verdict.reason, now, failures=verdict.consecutive_failures,
                              successes=verdict.consecutive_successes)
            if status is Health.NOT_SERVING:
                inherited.append(worker_id)
        # Only NOT_SERVING matters to routers in the gap: no verdict already routes like SERVING.
        await self._write_all([(w, self.tracker.get(w)) for w in inherited], lease)
        log.info("prober taking over", extra={"workers": len(workers), "inherited_not_serving": len(inherited)})

    def _end_term(self) -> None:
        self._term_lease = 0
        self.tracker.clear()
        self._written.clear()

    # -- one round --------------------------------------------------------------

    async def run_round(self) -> list[Transition]:
        """Probes every READY or DRAINING worker once and writes the verdicts that changed."""
        lease = self._term_lease
        workers = {name: entry.record for name, entry in self.view.entries(Kind.WORKER).items()
                   if entry.record.state in _PROBED_STATES and entry.record.endpoint}
        await self._forget(set(self.tracker.workers()) - set(workers), lease)
        for worker_id, record in workers.items():
            if self._endpoints.get(worker_id, record.endpoint) != record.endpoint:
                self.tracker.reset(worker_id)  # a new incarnation at a new address
            self._endpoints[worker_id] = record.endpoint
        index = gpu_index({name: e.record for name, e in self.view.entries(Kind.NODE).items()})
        ids = sorted(workers)
        results = await asyncio.gather(*(self._probe(workers[w].endpoint, self._identity(w, workers[w]))
                                         for w in ids))
        now = self._clock()
        transitions = []
        due = []
        for worker_id, (ok, detail) in zip(ids, results, strict=True):
            transition = self.tracker.observe(worker_id, ok, detail, now, gpu_problem(workers[worker_id], index))
            transitions.append(transition)
            if transition.changed:
                log.info("worker health changed", extra={
                    "worker_id": worker_id, "status": transition.new.status.value, "reason": transition.new.reason})
            if self._needs_write(worker_id, transition.new, lease):
                due.append((worker_id, transition.new))
        await self._write_all(due, lease)
        await self._close_channels(set(self._channels) - {(r.endpoint, self._identity(w, r))
                                                          for w, r in workers.items()})
        self.rounds += 1
        return transitions

    def _identity(self, worker_id: str, record: registry_pb2.WorkerRecord) -> str:
        """What the worker's certificate must name ("" when identities are not checked)."""
        if self._peer_tls is None or not self._peer_tls.verify_identity:
            return ""
        return peer_identity(worker_id, record.node)

    async def _probe(self, endpoint: str, identity: str) -> tuple[bool, str]:
        """(answered SERVING, what it answered or the RPC error code)."""
        async with self._limit:
            stub = health_pb2_grpc.HealthStub(self._channel(endpoint, identity))
            started = time.monotonic()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
                return (reply.status == health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.aio.AioRpcError as exc:
                return False, exc.code().name
            finally:
                if self._on_probe is not None:
                    self._on_probe(time.monotonic() - started)

    def _channel(self, endpoint: str, identity: str) -> grpc.aio.Channel:
        channel = self._channels.get((endpoint, identity))
        if channel is None:
            # Reconnect backoff capped near the interval: a worker that comes back must be
            # seen as soon as it answers, not after gRPC's default two-minute backoff.
            backoff_ms = max(100, int(self.interval * 1000))
            options = [
                ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
                ("grpc.min_reconnect_backoff_ms", min(backoff_ms, 1000)),
                ("grpc.max_reconnect_backoff_ms", backoff_ms),
                *(self._peer_tls.options(identity) if self._peer_tls is not None else ()),
            ]
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(endpoint, self._credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(endpoint, options=options)
            self._channels[(endpoint, identity)] = channel
        return channel

    async def _close_channels(self, keys: set[tuple[str, str]]) -> None:
        for key in keys:
            channel = self._channels.pop(key, None)
            if channel is not None:
                await channel.close()

    # -- writes -----------------------------------------------------------------

    def _needs_write(self, worker_id: str, state: WorkerHealth, lease: int) -> bool:
        if state.status is Health.UNKNOWN:
            return False
        written = self._written.get(worker_id)
        if written is None or (written.status, written.reason) != (state.status, state.reason):
            return True
        # Heal a verdict that vanished or was overwritten after we wrote it (the view
        # has caught up past our write and shows something else).
        entry = self.view.get(Kind.HEALTH, worker_id)
        return self.view.revision >= written.revision and (
            entry is None or entry.lease != lease or health_from_pb(entry.record) is not state.status)

    async def _write_all(self, due: list[tuple[str, WorkerHealth]], lease: int) -> None:
        async def write(worker_id: str, state: WorkerHealth) -> None:
            async with self._limit:
                await self._write(worker_id, state, lease)

        await asyncio.gather(*(write(w, s) for w, s in due))

    async def _write(self, worker_id: str, state: WorkerHealth, lease: int) -> None:
        verdict = registry_pb2.HealthVerdict(
            worker_id=worker_id, status=health_to_pb(state.status), reason=state.reason,
            checked_at_unix_ms=int(state.checked_at * 1000), consecutive_failures=state.consecutive_failures,
            consecutive_successes=state.consecutive_successes, prober=self.replica_id)
        try:
            revision = await self.client.put(self.keys.health(worker_id), encode(verdict), lease=lease)
        except EtcdUnavailable as exc:
            # Retried next round (nothing recorded as written); a lost lease ends the term.
            log.warning("verdict not written", extra={"worker_id": worker_id, "error": str(exc)})
            return
        self._written[worker_id] = _Written(state.status, state.reason, revision)
        if self._on_verdict is not None:
            self._on_verdict(state.status.value)

    async def _forget(self, worker_ids: set[str], lease: int) -> None:
        """Drops workers no longer probed, and the verdicts this term wrote for them."""
        self.tracker.retain(set(self.tracker.workers()) - worker_ids)
        for worker_id in sorted(worker_ids):
            self._endpoints.pop(worker_id, None)
            entry = self.view.get(Kind.HEALTH, worker_id)
            if self._written.pop(worker_id, None) is not None or (entry is not None and entry.lease == lease):
                with contextlib.suppress(EtcdUnavailable):
                    await self.client.delete(self.keys.health(worker_id))
