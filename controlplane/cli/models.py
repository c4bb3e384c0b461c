"""Model specs: what the fleet should serve (`models`, `models put`, `models delete`)."""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.cli import render
from controlplane.cli.client import EXIT_USAGE, CliError
from controlplane.cli.common import Output, OutputOption, emit, state
from tandem.v1 import admin_pb2, registry_pb2

models_app = typer.Typer(help="Model specs: list (no subcommand), put, delete.", no_args_is_help=False)


@models_app.callback(invoke_without_command=True)
def list_models(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """List model specs and the models workers serve (the default), or manage specs with put / delete."""
    if ctx.invoked_subcommand is not None:
        return
    response = state(ctx).call("ListModelSpecs", admin_pb2.ListModelSpecsRequest())
    # A model can be served without a spec (`tandemctl up` registers workers directly): show both.
    served = render.served_models(state(ctx).call("ListWorkers", admin_pb2.ListWorkersRequest()))
    data = {**render.to_dict(response), "served": [s.to_dict() for s in served]}
    emit(output, data, lambda width: render.models(response, served, width))


def parse_engine_args(items: list[str]) -> dict[str, str]:
    """{"k": "v"} from ["k=v", ...]; CliError naming --engine-arg otherwise."""
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"tandemctl: --engine-arg expects key=value, got {item!r}", EXIT_USAGE)
        args[key.strip()] = value
    return args


@models_app.command("put")
def put(ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="model name")],
        checkpoint: Annotated[str, typer.Option(help="local Hugging Face directory, or a built-in name (tiny)")],
        tokenizer: Annotated[str, typer.Option(help="tokenizer directory; default: the checkpoint's own")] = "",
        prefill: Annotated[int, typer.Option(min=0, max=10_000, help="desired prefill workers")] = 1,
        decode: Annotated[int, typer.Option(min=0, max=10_000, help="desired decode workers")] = 1,
        ttft_ms: Annotated[float, typer.Option(min=0, help="time-to-first-token target (p90), ms; 0: none")] = 0,
        itl_ms: Annotated[float, typer.Option(min=0, help="inter-token latency target (p90), ms; 0: none")] = 0,
        max_context: Annotated[int, typer.Option(min=0, help="prompt + output token limit; 0: the model's")] = 0,
        max_output: Annotated[int, typer.Option(min=0, help="output token limit; 0: the model's")] = 0,
        engine_arg: Annotated[list[str] | None, typer.Option(help="engine setting key=value (repeatable)")] = None,
        output: OutputOption = Output.table) -> None:
    """Create or replace a model spec."""
    spec = registry_pb2.ModelSpec(
        name=name, checkpoint=checkpoint, tokenizer=tokenizer, desired_prefill_workers=prefill,
        desired_decode_workers=decode, slo=registry_pb2.ServiceLevelObjectives(ttft_ms=ttft_ms, inter_token_ms=itl_ms),
        max_context_tokens=max_context, max_output_tokens=max_output,
        engine_args=parse_engine_args(engine_arg or []),
    )
    response = state(ctx).call("PutModelSpec", admin_pb2.PutModelSpecRequest(spec=spec))
    emit(output, response, lambda width: render.models(admin_pb2.ListModelSpecsResponse(models=[response.spec]),
                                                       width=width))


@models_app.command("delete")
def delete(ctx: typer.Context, name: Annotated[str, typer.Argument(help="model name")]) -> None:
    """Delete a model spec (its workers are not stopped by this)."""
    state(ctx).call("DeleteModelSpec", admin_pb2.DeleteModelSpecRequest(name=name))
    emit(Output.table, admin_pb2.DeleteModelSpecResponse(), f"model spec {name} deleted")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
