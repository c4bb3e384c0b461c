"""Operator intents: drain and undrain workers, cordon and uncordon nodes."""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.cli import render
from controlplane.cli.common import Output, OutputOption, emit, state
from tandem.v1 import admin_pb2

ReasonOption = Annotated[str, typer.Option(help="why, for whoever looks later")]


def drain(ctx: typer.Context,
          worker: Annotated[str, typer.Argument(help="worker id")],
          reason: ReasonOption = "",
          undo: Annotated[bool, typer.Option("--undo", help="withdraw the drain request instead")] = False,
          output: OutputOption = Output.table) -> None:
    """Ask a worker to stop taking requests, finish in-flight ones and leave."""
    if undo:
        undrain(ctx, worker, output)
        return
    response = state(ctx).call("DrainWorker", admin_pb2.DrainWorkerRequest(worker_id=worker, reason=reason))
    emit(output, response, render.drained(response))


def undrain(ctx: typer.Context,
            worker: Annotated[str, typer.Argument(help="worker id")],
            output: OutputOption = Output.table) -> None:
    """Withdraw a drain request (a worker that already left stays gone)."""
    response = state(ctx).call("UndrainWorker", admin_pb2.UndrainWorkerRequest(worker_id=worker))
    emit(output, response, render.undrained(worker, response))


def cordon(ctx: typer.Context,
           node: Annotated[str, typer.Argument(help="node name")],
           reason: ReasonOption = "",
           output: OutputOption = Output.table) -> None:
    """Send no new work to a node's workers (in-flight work finishes)."""
    response = state(ctx).call("CordonNode", admin_pb2.CordonNodeRequest(node=node, reason=reason))
    emit(output, response, render.cordoned(response))


def uncordon(ctx: typer.Context,
             node: Annotated[str, typer.Argument(help="node name")],
             output: OutputOption = Output.table) -> None:
    """Let work go to a node again."""
    response = state(ctx).call("UncordonNode", admin_pb2.UncordonNodeRequest(node=node))
    emit(output, response, render.uncordoned(node, response))


def register(app: typer.Typer) -> None:
    for command in (drain, undrain, cordon, uncordon):
        app.command()(command)
