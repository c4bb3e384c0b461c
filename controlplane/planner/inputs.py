"""What the planner sees, built from registry records, and the plan it writes back. Pure.

Demand: every router's DemandReport for the model, summed. Rates add up;
means are weighted by each router's counts; a percentile cannot be merged
exactly from summaries, so the highest router's p90 stands for the fleet's
(conservative: the planner never thinks latency better than a router saw it).

Supply: the model's workers that serve (READY) or are about to (SWITCHING),
in prefill or decode. A worker with a role intent it has not taken yet
counts in the intent's role from the intent's time: the switch is under way
and planning it again would move it twice. A worker not switchable
(WorkerRecord.switchable_roles lacks either role) keeps its role.

Clock: the planner's `now_s` is wall-clock seconds, the unit of the records'
*_unix_ms fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from controlplane.planner import Demand as PlannerDemand
from controlplane.planner import Plan, Slo, WorkerSupply
from router_svc.candidates import ModelShape
from router_svc.candidates_pb import shape_from_pb
from tandem.v1 import common_pb2, registry_pb2

# A model spec without SLO targets is planned for these (an interactive chat service).
DEFAULT_SLO = Slo(ttft_s=1.0, inter_token_s=0.05)

ROLE_NAMES: Mapping[int, str] = {common_pb2.ROLE_PREFILL: "prefill", common_pb2.ROLE_DECODE: "decode"}
ROLE_OF_NAME: Mapping[str, common_pb2.Role.ValueType] = {
    "prefill": common_pb2.ROLE_PREFILL, "decode": common_pb2.ROLE_DECODE}
_PLANNED_STATES = (registry_pb2.WORKER_STATE_READY, registry_pb2.WORKER_STATE_SWITCHING)


def merged_demand(model: str, reports: Iterable[registry_pb2.DemandReport]) -> registry_pb2.ModelDemand:
    """Every router's figures for `model` as one ModelDemand (zeros when no router saw it)."""
    parts = [m for report in reports for m in report.models if m.model == model and _sane(m)]
    total = registry_pb2.ModelDemand(model=model)
    if not parts:
        return total
    total.requests = sum(p.requests for p in parts)
    total.arrival_rate_rps = sum(p.arrival_rate_rps for p in parts)
    total.finished = sum(p.finished for p in parts)
    total.failed = sum(p.failed for p in parts)
    total.within_slo = sum(p.within_slo for p in parts)
    total.prompt_tokens_mean = _weighted(parts, "prompt_tokens_mean", "requests")
    total.output_tokens_mean = _weighted(parts, "output_tokens_mean", "finished")
    for field in ("prompt_tokens_p90", "output_tokens_p90", "ttft_ms_p50", "ttft_ms_p90",
                  "inter_token_ms_p50", "inter_token_ms_p90"):
        setattr(total, field, max(getattr(p, field) for p in parts))
    return total


_FIGURES = ("arrival_rate_rps", "prompt_tokens_mean", "prompt_tokens_p90", "output_tokens_mean", "output_tokens_p90",
            "ttft_ms_p50", "ttft_ms_p90", "inter_token_ms_p50", "inter_token_ms_p90")


def _sane(part: registry_pb2.ModelDemand) -> bool:
    """A router's figures the planner can use: finite and not negative. A report with NaN or a negative
    rate (a bug, or a router's etcd user misused) is left out, not allowed to break every round."""
    return all(math.isfinite(v := getattr(part, name)) and v >= 0 for name in _FIGURES)


def _weighted(parts: Sequence[registry_pb2.ModelDemand], value: str, weight: str) -> float:
    weights = [getattr(p, weight) for p in parts]
    if not sum(weights):
        return 0.0
    return sum(getattr(p, value) * w for p, w in zip(parts, weights, strict=True)) / sum(weights)


def planner_demand(demand: registry_pb2.ModelDemand) -> PlannerDemand:
    """The planner's Demand. Output length is known only for finished requests: with none finished
    yet the prompt-side figures stand alone (output 1 token), which is what the fleet has seen."""
    return PlannerDemand(arrival_rps=demand.arrival_rate_rps, prompt_tokens=demand.prompt_tokens_mean,
                         output_tokens=max(demand.output_tokens_mean, 1.0),
                         prompt_tokens_p90=demand.prompt_tokens_p90, output_tokens_p90=demand.output_tokens_p90,
                         ttft_p90_s=demand.ttft_ms_p90 / 1000, inter_token_p90_s=demand.inter_token_ms_p90 / 1000)


def slo_of(spec: registry_pb2.ModelSpec | None) -> Slo:
    """The spec's targets; DEFAULT_SLO's for any it leaves unset."""
    slo = spec.slo if spec is not None else registry_pb2.ServiceLevelObjectives()
    return Slo(ttft_s=slo.ttft_ms / 1000 if slo.ttft_ms > 0 else DEFAULT_SLO.ttft_s,
               inter_token_s=slo.inter_token_ms / 1000 if slo.inter_token_ms > 0 else DEFAULT_SLO.inter_token_s)


def switchable(record: registry_pb2.WorkerRecord) -> bool:
    return all(role in record.switchable_roles for role in ROLE_NAMES)


def planned_workers(model: str, records: Iterable[registry_pb2.WorkerRecord]) -> list[registry_pb2.WorkerRecord]:
    """The model's workers the planner counts, by worker id."""
    return sorted((r for r in records if r.model == model and r.state in _PLANNED_STATES
                   and r.role in ROLE_NAMES), key=lambda r: r.worker_id)


def supply_of(workers: Sequence[registry_pb2.WorkerRecord],
              intents: Mapping[str, registry_pb2.RoleIntent]) -> list[WorkerSupply]:
    """One WorkerSupply per planned worker (see planned_workers), pending intents applied."""
    out = []
    for record in workers:
        role, since_ms = record.role, record.role_since_unix_ms or record.started_at_unix_ms
        intent = intents.get(record.worker_id)
        can_switch = switchable(record)
        if intent is not None and intent.role != role and intent.role in ROLE_NAMES and can_switch:
            role, since_ms = intent.role, max(since_ms, intent.requested_at_unix_ms)
        capacity = record.capacity
        out.append(WorkerSupply(
            worker_id=record.worker_id, gpu_type=record.gpu_type, gpu_count=max(record.gpu_count, 1),
            role=ROLE_NAMES[role], switchable=can_switch, role_since_s=since_ms / 1000,
            kv_capacity_tokens=int(capacity.kv_blocks_total * capacity.kv_block_size_tokens),
            max_batch_size=int(capacity.max_batch_size)))
    return out


def shape_of(workers: Iterable[registry_pb2.WorkerRecord]) -> ModelShape:
    """The shape the model's workers publish (the first that has one); the cost model's default otherwise."""
    for record in workers:
        if record.HasField("model_shape"):
            shape = shape_from_pb(record.model_shape)
            if shape is not None:
                return shape
    return ModelShape()


def plan_record(model: str, plan: Plan, *, generation: int, planner: str, mode: str, now_ms: int,
                demand: registry_pb2.ModelDemand, slo: Slo, supply: Sequence[WorkerSupply]) -> registry_pb2.PlanRecord:
    """The PlanRecord of `plan` (not yet enacted)."""
    moves = {change.worker_id: change for change in plan.changes}
    workers = []
    for worker in supply:
        change = moves.get(worker.worker_id)
        planned = plan.assignment.get(worker.worker_id, worker.role)
        why = change.why if change is not None else _why_not(plan, worker.worker_id, worker.role)
        workers.append(registry_pb2.PlannedWorker(
            worker_id=worker.worker_id, gpu_type=worker.gpu_type, gpu_count=worker.gpu_count,
            current_role=ROLE_OF_NAME[worker.role], planned_role=ROLE_OF_NAME[planned], why=why))
    return registry_pb2.PlanRecord(
        model=model, generation=generation, planner=planner, planned_at_unix_ms=now_ms, mode=mode,
        demand=demand, slo=registry_pb2.ServiceLevelObjectives(ttft_ms=slo.ttft_s * 1000,
                                                               inter_token_ms=slo.inter_token_s * 1000),
        workers=workers, current_goodput_rps=plan.current.goodput_rps,
        planned_goodput_rps=plan.planned.goodput_rps, best_goodput_rps=plan.best.goodput_rps,
        explanation=plan.explanation)


def _why_not(plan: Plan, worker_id: str, role: str) -> str:
    """Why a worker keeps its role: a hold naming it, the plan-wide hold when the best assignment
    would move it, or that it is where the best assignment wants it."""
    mine = [line.split(": ", 1)[1] for line in plan.held if line.startswith(worker_id + ": ")]
    if mine:
        return "held: " + "; ".join(mine)
    best = plan.best_assignment.get(worker_id, role)
    if best != role:
        general = [line for line in plan.held if not any(line.startswith(w + ": ") for w in plan.assignment)]
        return f"best plan has it in {best}; held: " + ("; ".join(general) or "switch limits")
    return "stays: where the best plan has it"


def role_intents(plan: Plan, *, planner: str, generation: int, now_ms: int) -> list[registry_pb2.RoleIntent]:
    """One RoleIntent per change of `plan`."""
    return [registry_pb2.RoleIntent(worker_id=change.worker_id, role=ROLE_OF_NAME[change.to_role],
                                    requested_by=f"planner:{planner}", requested_at_unix_ms=now_ms,
                                    reason=change.why, plan_generation=generation)
            for change in plan.changes]
