"""A testbed of real processes on this machine: etcd (one member or three) and
Tandem services, each started through controlplane.supervisor and stopped by
PID. The test suite's integration and fault drills and the benchmarks in
bench/ all run their fleets through it, so they start processes one way.

    bed = Testbed(tmp_path)                       # etcd up
    decode = bed.start("d0", "decode_svc", "--engine", "sim", ...)   # waits until SERVING
    ...
    assert bed.close() == []                      # every child stopped; none left alive

Every child gets `--etcd` (all members), `--listen 127.0.0.1:0`, the lease TTL
and shutdown grace of the bed; prefill and decode workers also get
`--worker-id NAME --node node-NAME` so a drill can name, drain or cordon them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from controlplane.etcd_server import EtcdServer, start_cluster
from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdClient, EtcdSettings
from runtime.peers import PeerTls

WORKER_MODULES = ("prefill_svc", "decode_svc")


class Testbed:
    """etcd plus children. `close()` is safe twice and returns the children still alive."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, root: Path | None = None, *, members: int = 1, lease_ttl: int = 2,
                 shutdown_grace: float = 10.0, extra_args: Sequence[str] = ("--log-format", "text"),
                 keep: bool = True) -> None:
        # A directory made here is removed by close() unless `keep` (logs to read afterwards).
        self._remove = root is None and not keep
        self.root = Path(root or tempfile.mkdtemp(prefix="tandem-testbed-"))
        self.lease_ttl = lease_ttl
        self.shutdown_grace = shutdown_grace
        self.extra_args = list(extra_args)
        if members == 1:
            self.etcds = [EtcdServer(data_dir=self.root / "etcd").start()]
        else:
            self.etcds = start_cluster(members, base_dir=self.root / "etcd-cluster")
        self.children: dict[str, ManagedProcess] = {}

    @property
    def etcd(self) -> EtcdServer:
        return self.etcds[0]

    @property
    def etcd_endpoints(self) -> str:
        return ",".join(member.endpoint for member in self.etcds)

    def start(self, name: str, module: str, *args: str, wait: bool = True, timeout: float = 120.0,
              python: Sequence[str] = (), tls: PeerTls | None = None) -> ManagedProcess:
        """Starts `python -m module` with the bed's flags, then `args`; waits until it serves unless `wait`.

        `python` replaces the interpreter prefix (to run a service under cProfile, say); `tls`
        verifies a service that serves TLS while waiting for it.
        """
        argv = [*(python or [sys.executable, "-m", module]), "--etcd", self.etcd_endpoints,
                "--listen", "127.0.0.1:0", "--lease-ttl", str(self.lease_ttl),
                "--shutdown-grace", str(self.shutdown_grace), *self.extra_args, *args]
        if module in WORKER_MODULES:
            argv += ["--worker-id", name, "--node", f"node-{name}"]
        child = ManagedProcess(name, argv, log_dir=self.root / "logs").start()
        self.children[name] = child
        if wait:
            child.wait_ready(timeout, tls=tls)
        return child

    def workers(self) -> dict[str, ManagedProcess]:
        return {n: c for n, c in self.children.items() if "--worker-id" in c.argv}

    def client(self, timeout: float = 1.0) -> EtcdClient:
        """A new (not yet connected) etcd client for every member."""
        return EtcdClient(EtcdSettings.parse(self.etcd_endpoints, timeout=timeout))

    def leftovers(self) -> list[str]:
        return [c.name for c in self.children.values() if c.alive()]

    def close(self) -> list[str]:
        """Stops every child (SIGTERM, then SIGKILL) and every etcd member; returns the children still alive."""
        for child in reversed(list(self.children.values())):
            child.stop()
        for member in self.etcds:
            member.close()
        left = self.leftovers()
        if self._remove and not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
