"""What every tandemctl command shares: the per-invocation state, output format and printing."""

from __future__ import annotations

import enum
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from google.protobuf.message import Message
from rich.console import Console, RenderableType

from controlplane.cli import render
from controlplane.cli.client import AdminClient, Connection


class Output(enum.StrEnum):
    table = "table"
    wide = "wide"
    json = "json"


OutputOption = Annotated[Output, typer.Option(
    "--output", "-o", help="table (fits the terminal), wide (every column), or json for scripts")]

# A table renderer given the width to fit, or None for every column (-o wide).
Fitted = Callable[[int | None], RenderableType]


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


# -o wide never wraps: lines are as long as the table needs.
_UNLIMITED = 100_000


def _console(output: Output) -> Console:
    # A pipe gets wide lines rather than tables wrapped at 80 columns.
    width = _UNLIMITED if output is Output.wide else (None if sys.stdout.isatty() else 200)
    return Console(width=width, highlight=False, soft_wrap=False)


def emit(output: Output, response: Message | dict[str, Any], table: RenderableType | str | Fitted) -> None:
    """Prints `response` as JSON, or `table` for people.

    `table` is a rich renderable, a line, or a `Fitted` renderer: called with
    the terminal's width (table) or None (wide), it drops less important
    columns to fit, never cutting an id.
    """
    if output is Output.json:
        sys.stdout.write(render.to_json(response) + "\n")
        return
    console = _console(output)
    if callable(table):
        table = table(None if output is Output.wide else console.width)
    console.print(table)
