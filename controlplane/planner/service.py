"""The planner loop: a role of the control-plane leader.

Every `interval_s`, while its replica leads, for each model that has
workers: read what the routers report (DemandReport), the workers
(WorkerRecord), their pending role intents and the model's spec (SLO) from
the replica's registry view; ask the pure planner (controlplane.planner)
for a plan; write the PlanRecord and, in enact mode, one RoleIntent per
change. The workers carry the switches out themselves (worker.process).

Why the leader and not a service of its own: the planner needs exactly what
the leader already has (a registry view, the election, a lease), and two
planners must never enact at once; one more election would add a process
and a failure mode for nothing.

Why a crash cannot half-apply a plan: the plan and all its intents are
one etcd transaction, fenced by the leader's candidacy key
(Election.fence): written whole while this replica leads, not at all
otherwise. A worker mid-switch finishes it whoever leads; a new leader
reads the last PlanRecord (its generation continues) and the workers'
states (a SWITCHING worker counts in its new role), so it neither repeats
nor undoes a switch under way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.planner import PlannerConfig, plan_roles
from controlplane.planner.inputs import (
    ROLE_NAMES,
    merged_demand,
    plan_record,
    planned_workers,
    planner_demand,
    role_intents,
    shape_of,
    slo_of,
    supply_of,
)
from registry.election import Election
from registry.etcd_client import EtcdClient, EtcdUnavailable
from registry.keys import Keys, Kind
from registry.records import encode
from registry.routable import Health
from registry.routable_pb import health_from_pb
from registry.view import RegistryView
from runtime.tasks import cancel_and_wait
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)

MODES = ("off", "recommend", "enact")


@dataclass(frozen=True)
class RoundResult:
    """What one model's planning produced; `written` False when the fence refused it."""

    model: str
    record: registry_pb2.PlanRecord
    intents: tuple[registry_pb2.RoleIntent, ...]
    written: bool


class PlannerMetricsSink:
    """Where the planner reports; the control plane's Prometheus series implement it."""

    def planned(self, result: RoundResult) -> None:  # pragma: no cover - interface
        pass


class Planner:
    def __init__(self, client: EtcdClient, keys: Keys, view: RegistryView, election: Election, *,
                 replica_id: str, mode: str = "recommend", interval_s: float = 30.0,
                 config: PlannerConfig | None = None, sink: PlannerMetricsSink | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if mode not in MODES:
            raise ValueError(f"planner mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.client = client
        self.keys = keys
        self.view = view
        self.election = election
        self.replica_id = replica_id
        self.mode = mode
        self.interval_s = interval_s
        self.config = config or PlannerConfig()
        self.sink = sink or PlannerMetricsSink()
        self.clock = clock
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.mode != "off" and self._task is None:
            self._task = asyncio.create_task(self._run(), name="planner")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.election.is_leader:
                continue
            try:
                await self.run_round()
            except EtcdUnavailable as exc:
                log.warning("planner round skipped: etcd unavailable", extra={"error": str(exc)})
            except Exception:
                log.exception("planner round failed")

    def models(self) -> list[str]:
        """Models that have at least one planned worker."""
        records = [entry.record for entry in self.view.entries(Kind.WORKER).values()]
        return sorted({record.model for record in records if planned_workers(record.model, [record])})

    def _available_records(self) -> list[registry_pb2.WorkerRecord]:
        """Worker records the planner may count on: not drained, not on a cordoned node, not NOT_SERVING."""
        drains = self.view.entries(Kind.DRAIN)
        cordons = self.view.entries(Kind.CORDON)
        verdicts = self.view.entries(Kind.HEALTH)
        out = []
        for name, entry in self.view.entries(Kind.WORKER).items():
            record = entry.record
            verdict = verdicts.get(name)
            if name in drains or record.node in cordons or (
                    verdict is not None and health_from_pb(verdict.record) is Health.NOT_SERVING):
                continue
            out.append(record)
        return out

    def plan_model(self, model: str) -> tuple[registry_pb2.PlanRecord, tuple[registry_pb2.RoleIntent, ...]]:
        """The plan for `model` from the view as it is now, and the intents enacting it would write. Pure
        over the view's contents."""
        now = self.clock()
        now_ms = int(now * 1000)
        workers = planned_workers(model, self._available_records())
        intents = {name: entry.record for name, entry in self.view.entries(Kind.ROLE).items()}
        supply = supply_of(workers, intents)
        reports = [entry.record for entry in self.view.entries(Kind.DEMAND).values()]
        demand = merged_demand(model, reports)
        spec = self.view.get(Kind.MODEL, model)
        slo = slo_of(spec.record if spec is not None else None)
        plan = plan_roles(shape_of(workers), slo, planner_demand(demand), supply, now_s=now, config=self.config)
        previous = self.view.get(Kind.PLAN, model)
        generation = (previous.record.generation if previous is not None else 0) + 1
        record = plan_record(model, plan, generation=generation, planner=self.replica_id, mode=self.mode,
                             now_ms=now_ms, demand=demand, slo=slo, supply=supply)
        wanted = tuple(role_intents(plan, planner=self.replica_id, generation=generation, now_ms=now_ms))
        return record, wanted if self.mode == "enact" else ()

    async def run_round(self) -> list[RoundResult]:
        """Plans every model once and writes the results, fenced by leadership; [] when not leading."""
        results = []
        for model in self.models():
            fence = self.election.fence()
            if fence is None:
                log.info("planner stopped: this replica no longer leads")
                break
            record, intents = self.plan_model(model)
            record.enacted = bool(intents)
            items = [(self.keys.plan(model), encode(record))]
            items += [(self.keys.role(intent.worker_id), encode(intent)) for intent in intents]
            written = await self.client.put_all_if_created(fence[0], fence[1], items)
            result = RoundResult(model, record, intents, written)
            self._explain(result)
            self.sink.planned(result)
            results.append(result)
        self.rounds += 1
        return results

    def _explain(self, result: RoundResult) -> None:
        record = result.record
        if not result.written:
            log.warning("plan not written: leadership lost before the write (nothing of it applies)",
                        extra={"model": result.model, "generation": record.generation})
            return
        changes = [f"{w.worker_id} {ROLE_NAMES[w.current_role]}->{ROLE_NAMES[w.planned_role]}"
                   for w in record.workers if w.current_role != w.planned_role]
        log.info("plan: %s", record.explanation, extra={
            "model": result.model, "generation": record.generation, "mode": record.mode,
            "current_goodput_rps": round(record.current_goodput_rps, 3),
            "planned_goodput_rps": round(record.planned_goodput_rps, 3),
            "best_goodput_rps": round(record.best_goodput_rps, 3),
            "changes": changes, "enacted": record.enacted})
