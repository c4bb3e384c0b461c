"""Read commands: status, nodes, gpus, workers, leases."""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from controlplane.cli import render
from controlplane.cli.common import Output, OutputOption, emit, now_ms, state
from tandem.v1 import admin_pb2, common_pb2


class RoleChoice(enum.StrEnum):
    prefill = "prefill"
    decode = "decode"
    unified = "unified"


_ROLES = {RoleChoice.prefill: common_pb2.ROLE_PREFILL, RoleChoice.decode: common_pb2.ROLE_DECODE,
          RoleChoice.unified: common_pb2.ROLE_UNIFIED}


def status(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """The fleet at a glance: GPUs by model and what they do, nodes, workers, leader."""
    response = state(ctx).call("FleetStatus", admin_pb2.FleetStatusRequest())
    emit(output, response, render.fleet_status(response, now_ms()))


def nodes(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """GPU nodes: host, GPU mix, GPU health, simulated, cordon, driver, labels."""
    response = state(ctx).call("ListNodes", admin_pb2.ListNodesRequest())
    now = now_ms()
    emit(output, response, lambda width: render.nodes(response, now, width))


def gpus(ctx: typer.Context,
         node: Annotated[str, typer.Option(help="only this node's GPUs")] = "",
         output: OutputOption = Output.table) -> None:
    """Every GPU: model, memory, utilisation, temperature, power, health, and the worker holding it."""
    response = state(ctx).call("ListGpus", admin_pb2.ListGpusRequest(node=node))
    emit(output, response, lambda width: render.gpus(response, width))


def workers(ctx: typer.Context,
            model: Annotated[str, typer.Option(help="only workers serving this model")] = "",
            role: Annotated[RoleChoice | None, typer.Option(help="only workers of this role")] = None,
            node: Annotated[str, typer.Option(help="only workers on this node")] = "",
            output: OutputOption = Output.table) -> None:
    """Prefill, decode and unified workers: state, probe verdict, whether the router may use them."""
    request = admin_pb2.ListWorkersRequest(model=model, node=node,
                                           role=_ROLES[role] if role else common_pb2.ROLE_UNSPECIFIED)
    response = state(ctx).call("ListWorkers", request)
    now = now_ms()
    emit(output, response, lambda width: render.workers(response, now, width))


def leases(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """etcd leases, who holds each and the registry keys it keeps alive."""
    response = state(ctx).call("ListLeases", admin_pb2.ListLeasesRequest())
    emit(output, response, lambda width: render.leases(response, width))


def register(app: typer.Typer) -> None:
    for command in (status, nodes, gpus, workers, leases):
        app.command()(command)
