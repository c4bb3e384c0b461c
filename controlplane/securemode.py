"""The secure mode of a fleet on one machine (`tandemctl up --secure`, the secure-mode drills).

`SecureFleet(directory)` owns a certificate directory (controlplane.pki
layout) and says, per process, which flags make it

- log in to etcd with its own certificate (`--etcd-*-file`: TLS, and its
  Common Name is its etcd user, registry.etcd_auth),
- serve mutual TLS (`--tls-cert/--tls-key/--tls-client-ca`),
- call workers over mutual TLS, checking that each worker's certificate names
  the worker and node of the record dialed for (`--peer-*`,
  `--peer-verify-identity`).

The flag builders are pure; `prepare` writes certificates and `provision`
creates the etcd users (both idempotent).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controlplane import pki
from controlplane.etcd_server import EtcdTls
from registry.etcd_auth import WorkerIdentity, permission_plan, provision
from registry.etcd_client import EtcdClient, EtcdSettings
from registry.keys import DEFAULT_PREFIX, Keys
from runtime.peers import PeerTls

ROOT_PASSWORD_FILE = "etcd-root-password"


@dataclass(frozen=True)
class SecureFleet:
    """Certificates in `directory`; names are pki.CertSpec names ("router", "worker-decode-0", ...)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / f"{pki.CA_NAME}.pem"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def prepare(self, workers: Sequence[tuple[str, str]], nodes: Sequence[str]) -> list[str]:
        """Makes the CA (kept if present) and every certificate of these workers and nodes; returns those written."""
        ca, created = pki.ensure_ca(self.directory)
        return pki.issue_into(self.directory, ca, pki.fleet_specs(workers, nodes), force=created)

    def etcd_tls(self) -> EtcdTls:
        return EtcdTls(self.ca, self.cert("etcd"), self.key("etcd"))

    def etcd_args(self, name: str) -> list[str]:
        return ["--etcd-ca-file", str(self.ca), "--etcd-cert-file", str(self.cert(name)),
                "--etcd-key-file", str(self.key(name))]

    def serve_args(self, name: str) -> list[str]:
        return ["--tls-cert", str(self.cert(name)), "--tls-key", str(self.key(name)), "--tls-client-ca", str(self.ca)]

    def peer_args(self, name: str) -> list[str]:
        return ["--peer-ca-file", str(self.ca), "--peer-cert-file", str(self.cert(name)),
                "--peer-key-file", str(self.key(name)), "--peer-verify-identity"]

    def client_tls(self, name: str = "operator") -> PeerTls:
        """How a local tool (health checks, tandemctl) calls the services: by address, with `name`'s certificate."""
        return PeerTls(self.ca, self.cert(name), self.key(name))

    def etcd_settings(self, endpoint: str, name: str = "root", timeout: float = 5.0) -> EtcdSettings:
        return EtcdSettings.parse(endpoint, ca_file=self.ca, cert_file=self.cert(name), key_file=self.key(name),
                                  timeout=timeout)

    async def provision_async(self, endpoint: str, workers: Sequence[WorkerIdentity], nodes: Sequence[str],
                              prefix: str = DEFAULT_PREFIX) -> None:
        """Creates the etcd users and roles of these workers and nodes as root, then enables auth."""
        plan = permission_plan(Keys(prefix), workers, nodes)
        password = root_password(self.directory / ROOT_PASSWORD_FILE)
        async with EtcdClient(self.etcd_settings(endpoint)) as client:
            await provision(client, plan, root_password=password)

    def provision(self, endpoint: str, workers: Sequence[WorkerIdentity], nodes: Sequence[str],
                  prefix: str = DEFAULT_PREFIX) -> None:
        """provision_async, blocking (for callers without an event loop)."""
        asyncio.run(self.provision_async(endpoint, workers, nodes, prefix))


def root_password(path: Path) -> str:
    """etcd root's password (for etcdctl --user root): read from `path`, or made and written there (0600)."""
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password
