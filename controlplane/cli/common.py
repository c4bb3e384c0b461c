"""What every tandemctl command shares: the per-invocation state, output format and printing."""

from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from controlplane.cli import render
from controlplane.cli.client import AdminClient, Connection


class Output(enum.StrEnum):
    table = "table"
    json = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table for people, json for scripts")]


@dataclass
class CliState:
    """What every command gets through `ctx.obj`: the connection, and a client opened on first use."""

    connection: Connection
    _client: AdminClient | None = field(default=None, repr=False)

    def call(self, method: str, request: Message) -> Any:
        if self._client is None:
            self._client = AdminClient(self.connection)
        return self._client.call(method, request)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_object(CliState)
    assert obj is not None, "tandemctl callback did not run"
    return obj


def now_ms() -> int:
    return int(time.time() * 1000)


def _console() -> Console:
    # A pipe gets wide lines rather than tables wrapped at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False, soft_wrap=False)


def emit(output: Output, response: Message, table: RenderableType | str) -> None:
    """Prints `response` as JSON, or `table` (a rich renderable or a line) for people."""
    if output is Output.json:
        sys.stdout.write(render.to_json(response) + "\n")
    else:
        _console().print(table)
