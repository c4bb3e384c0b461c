"""Role intents: `tandemctl role set WORKER prefill|decode`, `tandemctl role clear WORKER`.

A role intent makes a worker switch role live: it finishes or hands over its
in-flight work, re-registers in the new role and goes on, with no restart
(docs/tandemctl.md). The worker table shows a switch under way and a pending
intent.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from controlplane.cli import render
from controlplane.cli.common import Output, OutputOption, emit, state
from tandem.v1 import admin_pb2, common_pb2


class SwitchRole(enum.StrEnum):
    prefill = "prefill"
    decode = "decode"


_ROLES = {SwitchRole.prefill: common_pb2.ROLE_PREFILL, SwitchRole.decode: common_pb2.ROLE_DECODE}

role_app = typer.Typer(help="Switch a worker's role live (prefill or decode), or withdraw the request.",
                       no_args_is_help=True)


@role_app.command("set")
def set_role(ctx: typer.Context,
             worker: Annotated[str, typer.Argument(help="worker id")],
             role: Annotated[SwitchRole, typer.Argument(help="the role to serve")],
             reason: Annotated[str, typer.Option(help="why, for whoever looks later")] = "",
             output: OutputOption = Output.table) -> None:
    """Ask a worker to serve ROLE: it finishes or hands over its work, then serves ROLE (no restart)."""
    response = state(ctx).call("SetWorkerRole", admin_pb2.SetWorkerRoleRequest(
        worker_id=worker, role=_ROLES[role], reason=reason))
    emit(output, response, render.role_set(response))


@role_app.command("clear")
def clear_role(ctx: typer.Context,
               worker: Annotated[str, typer.Argument(help="worker id")],
               output: OutputOption = Output.table) -> None:
    """Withdraw a worker's role intent (it keeps the role it has)."""
    response = state(ctx).call("ClearWorkerRole", admin_pb2.ClearWorkerRoleRequest(worker_id=worker))
    emit(output, response, render.role_cleared(worker, response))


def register(app: typer.Typer) -> None:
    app.add_typer(role_app, name="role")
