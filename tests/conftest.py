"""Shared fixtures: a real etcd on free ports, real child processes.

Nothing here mocks etcd or gRPC. `etcd` is a fresh single-member etcd in a
temp dir for each test that asks for it (about half a second to start);
`processes` starts children through controlplane.supervisor and stops every
one of them by PID at the end of the test, failing the test if one is left.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.etcd_server import EtcdServer
from controlplane.supervisor import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A running single-member etcd; `etcd.endpoint` is host:port for clients."""
    server = EtcdServer(data_dir=tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.close()


class ProcessGroup:
    """Children of one test; every one is stopped at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[ManagedProcess] = []

    def start(self, name: str, module: str, *args: str, env: dict[str, str] | None = None,
              wait: bool = True, timeout: float = 60.0) -> ManagedProcess:
        """`python -m module args...`, waited for until SERVING unless wait=False."""
        child = ManagedProcess(name, [sys.executable, "-m", module, *args], env=env, log_dir=self.log_dir)
        self.children.append(child)
        child.start()
        if wait:
            child.wait_ready(timeout)
        return child

    def stop_all(self) -> list[str]:
        leftovers = []
        for child in reversed(self.children):
            child.stop()
            if child.alive():
                leftovers.append(f"{child.name} (pid {child.pid})")
        return leftovers


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path / "logs")
    yield group
    leftovers = group.stop_all()
    assert not leftovers, f"processes left running: {leftovers}"
