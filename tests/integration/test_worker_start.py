"""A worker's start with `--gpu-uuids`: the GPU claim comes before the model load, and waits for etcd.

Real processes against a real etcd. Evidence comes from the workers' own JSON
log lines (their order, never their timing) and from etcd's records.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.etcd_server import EtcdServer
from controlplane.supervisor import ManagedProcess
from registry.etcd_client import EtcdClient, EtcdSettings, EtcdUnavailable
from registry.keys import Keys, Kind
from registry.store import Registry
from tandem.v1 import registry_pb2
from worker.process import EXIT_GPU_CLAIMED

pytestmark = pytest.mark.integration

GPU = "SIM-start-node-0"
LOADING = "loading engine"


def worker(name: str, etcd_endpoint: str, log_dir: Path, module: str = "prefill_svc") -> ManagedProcess:
    """A sim worker on GPU (not started)."""
    argv = [sys.executable, "-m", module, "--etcd", etcd_endpoint, "--listen", "127.0.0.1:0",
            "--lease-ttl", "2", "--shutdown-grace", "5", "--engine", "sim", "--model", "llama-3-8b",
            "--gpu-type", "H100-SXM", "--speedup", "1000", "--worker-id", name, "--node", "start-node",
            "--gpu-uuids", GPU]
    return ManagedProcess(name, argv, log_dir=log_dir)


def messages(child: ManagedProcess) -> list[str]:
    """The child's log messages so far, in order (lines that are not Tandem's JSON are skipped)."""
    found = []
    for line in child.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "msg" in entry:
            found.append(str(entry["msg"]))
    return found


def attempts(child: ManagedProcess) -> list[str]:
    return [m for m in messages(child) if m.startswith("GPU claim attempt")]


def wait_for(probe: Callable[[], Any], what: str, child: ManagedProcess, timeout: float = 60.0) -> Any:
    """Polls `probe()` until truthy (a bound, not a pause); fails with the child's log tail."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s; log of {child.name}:\n{child.log_tail()}"
        time.sleep(0.05)  # poll interval
    return result


def exit_status(child: ManagedProcess, timeout: float = 60.0) -> int:
    assert child.process is not None
    try:
        return child.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{child.name} still running after {timeout}s:\n{child.log_tail()}") from None


def index_of(lines: list[str], fragment: str) -> int:
    return next(i for i, line in enumerate(lines) if fragment in line)


async def registry_state(endpoint: str) -> tuple[dict[str, str], dict[str, int]]:
    """(GPU uuid -> claiming worker, worker id -> state) in etcd now."""
    async with EtcdClient(EtcdSettings.parse(endpoint)) as client:
        registry = Registry(client, Keys())
        _, claims = await registry.list(Kind.GPU_CLAIM)
        _, workers = await registry.list(Kind.WORKER)
    return ({c.name: c.record.worker_id for c in claims},
            {w.name: w.record.state for w in workers})


@pytest.fixture
def children() -> Iterator[list[ManagedProcess]]:
    started: list[ManagedProcess] = []
    yield started
    for child in reversed(started):
        child.stop()
    left = [f"{c.name} (pid {c.pid})" for c in started if c.alive()]
    assert not left, f"processes left running: {left}"


@pytest.fixture
def etcd_later(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd member with its port chosen but not started: the test starts it when it wants."""
    server = EtcdServer(data_dir=tmp_path / "etcd-later")
    try:
        yield server
    finally:
        server.close()


async def test_a_second_worker_on_a_claimed_gpu_exits_without_loading(
        etcd: EtcdServer, children: list[ManagedProcess], tmp_path: Path) -> None:
    # The node's agent declares the simulated GPU both workers are pointed at (SIM-start-node-0).
    agent = ManagedProcess("agent", [sys.executable, "-m", "controlplane.agent", "--etcd", etcd.endpoint,
                                     "--lease-ttl", "2", "--node", "start-node", "--simulate-gpus", "H100-SXM:1"],
                           log_dir=tmp_path / "logs")
    children.append(agent.start())
    agent.wait_ready(60)
    first = worker("holder", etcd.endpoint, tmp_path / "logs")
    children.append(first.start())
    first.wait_ready(120)
    second = worker("intruder", etcd.endpoint, tmp_path / "logs", module="decode_svc")
    children.append(second.start())

    assert exit_status(second) == EXIT_GPU_CLAIMED
    lines = messages(second)
    refusals = [line for line in lines if line.startswith("cannot claim GPUs")]
    assert len(refusals) == 1 and f"{GPU} is held by worker holder" in refusals[0], lines
    assert "\n" not in refusals[0], "one line for the journal"
    assert not any(LOADING in line for line in lines), f"the model was loaded before the refusal: {lines}"

    claims, workers = await registry_state(etcd.endpoint)
    assert claims == {GPU: "holder"}
    assert workers == {"holder": registry_pb2.WORKER_STATE_READY}, "the refused worker left no record"
    assert first.alive() and first.stop() == 0


async def test_a_worker_started_before_etcd_claims_once_etcd_answers(
        etcd_later: EtcdServer, children: list[ManagedProcess], tmp_path: Path) -> None:
    child = worker("early", etcd_later.endpoint, tmp_path / "logs")
    children.append(child.start())
    # It waits, saying why and for how long, attempt after attempt (the delays grow).
    retries = wait_for(lambda: attempts(child)[:2] if len(attempts(child)) >= 2 else None,
                       "two logged claim attempts", child)
    assert retries[0].startswith("GPU claim attempt 1 failed: ") and "retrying in 0.5 s" in retries[0], retries
    assert etcd_later.endpoint in retries[0], "the reason names the etcd it waits for"
    assert "retrying in 1.0 s" in retries[1], retries
    assert child.alive() and not any(LOADING in m for m in messages(child))

    etcd_later.start()
    child.wait_ready(120)
    lines = messages(child)
    assert index_of(lines, "GPUs claimed after") < index_of(lines, LOADING) < index_of(lines, "worker ready")
    try:
        claims, workers = await registry_state(etcd_later.endpoint)
    except EtcdUnavailable as exc:
        # Seen once on a loaded CI machine, with the worker registered through this same etcd a moment
        # before: say whether etcd is still there and what it and the worker logged, to find why.
        raise AssertionError(f"{exc}\netcd running: {etcd_later.running}\netcd log:\n{etcd_later.log_tail()}"
                             f"\nworker log:\n{child.log_tail()}") from exc
    assert claims == {GPU: "early"}
    assert workers == {"early": registry_pb2.WORKER_STATE_READY}
    assert child.stop() == 0


def test_sigterm_while_waiting_for_etcd_stops_the_worker(
        etcd_later: EtcdServer, children: list[ManagedProcess], tmp_path: Path) -> None:
    child = worker("waiting", etcd_later.endpoint, tmp_path / "logs")
    children.append(child.start())
    wait_for(lambda: len(attempts(child)) >= 2, "a logged retry", child)

    child.send(signal.SIGTERM)
    assert exit_status(child) == 0
    lines = messages(child)
    assert any("stopped while waiting to claim GPUs" in line for line in lines), lines
    assert not any(LOADING in line for line in lines), lines
    assert lines[-1] == "worker stopped"
