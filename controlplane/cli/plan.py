"""`tandemctl plan`: the planner's latest plan per model, and what it would change."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.text import Text

from controlplane.cli import render
from controlplane.cli.common import Output, OutputOption, emit, now_ms, state
from tandem.v1 import admin_pb2, registry_pb2

_COLUMNS = (render.Col("WORKER", ident=True), render.Col("GPU", drop=2), render.Col("ROLE"),
            render.Col("PLANNED"), render.Col("WHY", drop=1))


def _rps(value: float) -> str:
    return f"{value:.2f} req/s"


def _summary(plan: registry_pb2.PlanRecord, now: int) -> str:
    demand, slo = plan.demand, plan.slo
    moves = sum(1 for w in plan.workers if w.current_role != w.planned_role)
    lines = [
        f"model {plan.model}: plan {plan.generation} by {plan.planner}, {render.age(plan.planned_at_unix_ms, now)} ago,"
        f" mode {plan.mode}{' (enacted)' if plan.enacted else ''}",
        f"  saw      {demand.arrival_rate_rps:.2f} req/s, prompts {demand.prompt_tokens_mean:.0f} tok "
        f"(p90 {demand.prompt_tokens_p90:.0f}), outputs {demand.output_tokens_mean:.0f} tok "
        f"(p90 {demand.output_tokens_p90:.0f}); TTFT p90 {demand.ttft_ms_p90:.0f} ms, "
        f"inter-token p90 {demand.inter_token_ms_p90:.1f} ms",
        f"  SLO      TTFT {slo.ttft_ms:.0f} ms, inter-token {slo.inter_token_ms:.0f} ms (p90)",
        f"  goodput  current {_rps(plan.current_goodput_rps)}, planned {_rps(plan.planned_goodput_rps)}, "
        f"best {_rps(plan.best_goodput_rps)} (predicted)",
        f"  changes  {moves or 'none'}: {plan.explanation}",
    ]
    return "\n".join(lines)


def plans(response: admin_pb2.GetPlanResponse, now: int, width: int | None = None) -> RenderableType:
    """Each model's plan: a summary, then its workers' current and planned roles."""
    if not response.plans:
        return Text("no plans yet (the control plane's planner writes one per model every round; "
                    "--planner-mode off disables it)")
    parts: list[RenderableType] = []
    for plan in response.plans:
        rows = [(w.worker_id, f"{w.gpu_count}x {w.gpu_type or 'unknown'}", render.role_name(w.current_role),
                 render.role_name(w.planned_role) + (" *" if w.planned_role != w.current_role else ""), w.why)
                for w in plan.workers]
        parts += [Text(_summary(plan, now)), render.fit(_COLUMNS, rows, width)]
    return Group(*parts)


def plan(ctx: typer.Context,
         model: Annotated[str, typer.Argument(help="only this model's plan")] = "",
         output: OutputOption = Output.table) -> None:
    """The planner's latest plan: what it saw, predicted goodput now and as planned, and the role changes."""
    response = state(ctx).call("GetPlan", admin_pb2.GetPlanRequest(model=model))
    emit(output, response, lambda width: plans(response, now_ms(), width))


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
