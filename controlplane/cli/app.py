"""tandemctl: the operator's command line for a Tandem fleet.

    tandemctl [--endpoint HOST:PORT] [--token T] [--ca-file F] [--timeout S] COMMAND ...

The typer app and its global options live here; commands live in modules
that each export `register(app)` and are listed in COMMAND_MODULES, so a new
command group (`up`, `generate`) is one module plus one line here.

Expected failures (unreachable endpoint, missing token, unknown worker) end
the process with one line on stderr and a documented exit status
(controlplane.cli.client.EXIT_*), never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from controlplane.cli.client import DEFAULT_ENDPOINT, CliError, Connection
from controlplane.cli.common import CliState
from runtime import __version__

COMMAND_MODULES = (
    "controlplane.cli.certs",
    "controlplane.cli.fleet",
    "controlplane.cli.intents",
    "controlplane.cli.models",
    "controlplane.cli.roles",
    "controlplane.cli.plan",
    "controlplane.cli.up",
)

app = typer.Typer(
    name="tandemctl",
    help="Operate a Tandem fleet: inventory, workers, leases, drain and cordon, role switches, model specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_line() -> str:
    return f"tandemctl {__version__}"


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def global_options(
    ctx: typer.Context,
    endpoint: Annotated[str, typer.Option(envvar="TANDEM_ENDPOINT", help="Admin API host:port")] = DEFAULT_ENDPOINT,
    token: Annotated[str, typer.Option(envvar="TANDEM_ADMIN_TOKEN", show_default=False,
                                       help="admin token, sent as 'authorization: Bearer ...'")] = "",
    ca_file: Annotated[Path | None, typer.Option(envvar="TANDEM_ADMIN_CA_FILE",
                                                 help="CA bundle to verify the control plane (enables TLS)")] = None,
    cert_file: Annotated[Path | None, typer.Option(envvar="TANDEM_ADMIN_CERT_FILE",
                                                   help="client certificate (mutual TLS)")] = None,
    key_file: Annotated[Path | None, typer.Option(envvar="TANDEM_ADMIN_KEY_FILE",
                                                  help="client certificate key (mutual TLS)")] = None,
    timeout: Annotated[float, typer.Option(envvar="TANDEM_ADMIN_TIMEOUT", min=0.1, max=3600,
                                           help="deadline of each call, seconds")] = 10.0,
    _version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                           help="print the version and exit")] = False,
) -> None:
    obj = CliState(Connection(endpoint=endpoint.strip().removeprefix("http://"), token=token.strip(),
                              ca_file=ca_file, cert_file=cert_file, key_file=key_file, timeout=timeout))
    ctx.obj = obj
    ctx.call_on_close(obj.close)


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


@app.command()
def version() -> None:
    """Print tandemctl's version."""
    print(version_line())


def main(argv: Sequence[str] | None = None) -> None:
    """Console script `tandemctl`. Exits with 0, or an EXIT_* status and one line on stderr.

    Usage errors (unknown flag, bad value) are reported by typer with status 2.
    """
    try:
        app(args=list(argv) if argv is not None else None, prog_name="tandemctl")
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # `tandemctl workers | head`: the reader left; nothing more to say.
        sys.exit(0)
