"""tandemctl certs / etcd-auth: the secure mode's certificates, and etcd users that only touch their own keys.

    tandemctl certs --dir /etc/tandem/pki --worker decode-0@gpu-7 --host gpu-7 --host 10.0.0.7
    tandemctl etcd-auth --etcd 10.0.0.2:2379 --dir /etc/tandem/pki --worker decode-0@gpu-7=GPU-8f0c...

`certs` makes a private CA (kept unless --force-ca) and a certificate per
service, node agent and worker (controlplane.pki); it is safe to run again
with more workers: existing certificates that still match are kept.
`etcd-auth` logs in to etcd as `root` (root.pem, or --root-password) and
creates one user and role per component with only its own key prefixes
(registry.etcd_auth), then enables auth. docs/security.md walks through both.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import grpc
import typer
from etcd3aio import EtcdError
from rich.console import Console
from rich.table import Table

from controlplane import pki
from controlplane.cli.client import CliError
from controlplane.securemode import ROOT_PASSWORD_FILE, root_password
from registry.etcd_auth import WorkerIdentity, permission_plan, provision
from registry.etcd_client import EtcdClient, EtcdSettings, EtcdUnavailable
from registry.keys import DEFAULT_PREFIX, Keys

DirOption = Annotated[Path, typer.Option("--dir", help="certificate directory (created; keys are 0600)")]
WorkerOption = Annotated[list[str] | None, typer.Option("--worker", help=(
    "a worker as WORKER_ID@NODE (its --worker-id and --node); repeat for each"))]
AgentOption = Annotated[list[str] | None, typer.Option("--node", help="a node whose agent needs a certificate")]


def _workers(values: list[str] | None) -> list[tuple[str, str]]:
    try:
        return [pki.parse_worker(v) for v in values or []]
    except ValueError as exc:
        raise CliError(f"tandemctl: {exc}", 2) from None


def certs(
    directory: DirOption = Path("tandem-pki"),
    worker: WorkerOption = None,
    node: AgentOption = None,
    host: Annotated[list[str] | None, typer.Option(help=(
        "a DNS name or IP address the services are reached by (repeat; default localhost, 127.0.0.1, ::1)"))] = None,
    days: Annotated[int, typer.Option(min=1, max=3650, help="validity of the service certificates")] = pki.DEFAULT_DAYS,
    services: Annotated[bool, typer.Option("--services/--no-services", help=(
        "also the fleet-wide certificates (control plane, router, operator, root, etcd); --no-services "
        "for a run per GPU host with that host's --host names"))] = True,
    force: Annotated[bool, typer.Option("--force", help="reissue every certificate, even current ones")] = False,
    force_ca: Annotated[bool, typer.Option("--force-ca", help=(
        "replace the CA (every certificate it signed stops working)"))] = False,
) -> None:
    """Make a private CA and the fleet's certificates (workers named by identity, keys 0600)."""
    workers = _workers(worker)
    try:
        ca, created = pki.ensure_ca(directory, force=force_ca)
    except ValueError as exc:
        raise CliError(f"tandemctl certs: {exc}", 2) from None
    specs = pki.fleet_specs(workers, node or [], tuple(host or pki.LOCAL_HOSTS), services=services)
    written = pki.issue_into(directory, ca, specs, force=force or created, days=days)
    console = Console(highlight=False)
    console.print(f"CA {'created' if created else 'kept'}: {ca.cert_path}")
    table = Table("file", "", "etcd user (CN)", "names (SAN)", box=None)
    for spec in specs:
        table.add_row(f"{spec.name}.pem", "written" if spec.name in written else "kept", spec.common_name,
                      ", ".join((*spec.dns, *spec.hosts)))
    console.print(table)
    console.print(f"Copy ca.pem and each service's .pem/.key to its host; keep ca.key off the fleet. "
                  f"Next: tandemctl etcd-auth --dir {directory} --etcd HOST:PORT ...")


def etcd_auth(
    etcd: Annotated[str, typer.Option(envvar="TANDEM_ETCD", help="etcd endpoints (TLS, client-cert-auth)")],
    directory: DirOption = Path("tandem-pki"),
    worker: Annotated[list[str] | None, typer.Option("--worker", help=(
        "a worker as WORKER_ID@NODE[=GPU_UUID,...]: it may claim those GPUs only (any GPU when none are "
        "listed); repeat for each"))] = None,
    node: AgentOption = None,
    etcd_prefix: Annotated[str, typer.Option(help="registry key prefix")] = DEFAULT_PREFIX,
    root_password_file: Annotated[Path | None, typer.Option(help=(
        "root's password for etcdctl users; default: a random one written to DIR/etcd-root-password"))] = None,
) -> None:
    """Create an etcd user and role per component (its own keys only) and enable auth. Safe to repeat."""
    identities = []
    for text in worker or []:
        named, _, gpus = text.partition("=")
        (worker_id, worker_node), = _workers([named])
        # Listed GPUs: exactly their claim keys; none listed: any GPU claim (the uuids are not known here).
        identities.append(WorkerIdentity(worker_id, worker_node, tuple(filter(None, gpus.split(","))) or None))
    password_path = root_password_file or directory / ROOT_PASSWORD_FILE
    password = root_password(password_path)
    plan = permission_plan(Keys(etcd_prefix), identities, [*(node or []), *(w.node for w in identities)])
    settings = EtcdSettings.parse(etcd, ca_file=directory / "ca.pem", cert_file=directory / "root.pem",
                                  key_file=directory / "root.key", timeout=5.0)

    async def run() -> None:
        async with EtcdClient(settings) as client:
            await provision(client, plan, root_password=password)

    try:
        asyncio.run(run())
    except (EtcdUnavailable, EtcdError, grpc.aio.AioRpcError, OSError) as exc:
        raise CliError(f"tandemctl etcd-auth: {type(exc).__name__}: {exc}", 1) from None
    for role in plan:
        print(f"{role.user}: " + ", ".join(f"{g.access.value} {g.key}{'*' if g.prefix else ''}"
                                           for g in role.grants))
    print(f"etcd auth is on; root's password is in {password_path}")


def register(app: typer.Typer) -> None:
    app.command(name="certs")(certs)
    app.command(name="etcd-auth")(etcd_auth)
