"""tandemctl as a real command against a real control plane, a real agent and a real etcd."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from controlplane.etcd_server import EtcdServer
from tandem.v1 import admin_pb2, admin_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-tests"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def tandemctl(*args: str, endpoint: str = "", env: dict[str, str] | None = None) -> Run:
    """`python -m controlplane.cli ...` with a clean admin environment (no token unless given)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    argv = [sys.executable, "-m", "controlplane.cli", *(["--endpoint", endpoint] if endpoint else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**base, **(env or {})})
    return Run(result.returncode, result.stdout, result.stderr)


def wait_for_fleet(endpoint: str, nodes: int, workers: int, timeout: float = 30) -> None:
    """Polls FleetStatus until the control plane's view holds the fleet."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        while True:
            reply = stub.FleetStatus(admin_pb2.FleetStatusRequest(), timeout=5)
            if reply.nodes == nodes and reply.workers == workers:
                return
            assert time.monotonic() < deadline, f"fleet not visible: {reply}"
            time.sleep(0.05)  # poll interval


@pytest.fixture
def fleet(processes: Any, etcd: EtcdServer) -> str:
    """A control plane (admin token required) with one simulated node and one decode worker holding a GPU."""
    cp = processes.start("cp", "controlplane.server", "--etcd", etcd.endpoint, "--listen", "127.0.0.1:0",
                         "--lease-ttl", "2", "--admin-token", TOKEN, "--log-format", "text", "--shutdown-grace", "2")
    processes.start("agent", "controlplane.agent", "--etcd", etcd.endpoint, "--node", "gpu-1", "--lease-ttl", "2",
                    "--simulate-gpus", "H100-SXM:4,A100-80GB:2")
    processes.start("worker", "tests.support.lease_holder", "--etcd", etcd.endpoint, "--worker-id", "d-0",
                    "--gpus", "SIM-gpu-1-0")
    wait_for_fleet(cp.endpoint, nodes=1, workers=1)
    return str(cp.endpoint)


def test_reads_show_the_registered_fleet(fleet: str) -> None:
    status = tandemctl("status", endpoint=fleet)
    assert status.code == 0, status.err
    table = [line.split() for line in status.out.splitlines()]
    assert ["H100-SXM", "4", "0", "1", "0", "3", "0", "4"] in table  # total prefill decode unified idle unhealthy sim
    assert ["A100-80GB", "2", "0", "0", "0", "2", "0", "2"] in table
    assert "nodes    1 (0 cordoned)" in status.out and "view     live" in status.out

    summary = {row["gpuModel"]: row for row in tandemctl("status", "-o", "json", endpoint=fleet).json()["gpuModels"]}
    assert (summary["H100-SXM"]["total"], summary["H100-SXM"]["decode"], summary["H100-SXM"]["idle"]) == (4, 1, 3)

    workers = tandemctl("workers", "-o", "json", endpoint=fleet)
    assert workers.code == 0, workers.err
    (worker,) = workers.json()["workers"]
    assert worker["record"]["workerId"] == "d-0" and worker["record"]["role"] == "ROLE_DECODE"
    assert tandemctl("workers", "--role", "prefill", "-o", "json", endpoint=fleet).json() == {"workers": []}

    # The endpoint may come from the environment, as scripts and shells set it.
    gpus = tandemctl("gpus", "--node", "gpu-1", "-o", "json", env={"TANDEM_ENDPOINT": fleet}).json()["gpus"]
    held = {g["gpu"]["uuid"]: g["workerId"] for g in gpus}
    assert held == {"SIM-gpu-1-0": "d-0", **{f"SIM-gpu-1-{i}": "" for i in range(1, 6)}}
    nodes = tandemctl("nodes", endpoint=fleet)
    assert nodes.code == 0 and "4x H100-SXM, 2x A100-80GB" in nodes.out
    wide = tandemctl("workers", "-o", "wide", endpoint=fleet)
    assert wide.code == 0 and "ENDPOINT" in wide.out and "AGE" in wide.out, wide.err

    # A model served without a spec still shows, with its workers.
    models = tandemctl("models", endpoint=fleet)
    table = [re.split(r"\s{2,}", line.strip()) for line in models.out.splitlines()]
    assert models.code == 0 and ["m", "1 decode (1 ready)", "(no spec)"] in [row[:3] for row in table], models.out
    assert tandemctl("models", "-o", "json", endpoint=fleet).json()["served"] == [
        {"model": "m", "prefill": 0, "decode": 1, "unified": 0, "ready": 1, "workers": 1}]


def test_mutations_need_the_admin_token(fleet: str) -> None:
    refused = tandemctl("drain", "d-0", endpoint=fleet)
    assert refused.code == 4 and refused.out == ""
    assert refused.err.splitlines() == [
        f"tandemctl: the control plane at {fleet} needs an admin token for DrainWorker: "
        "pass --token or set TANDEM_ADMIN_TOKEN."]

    drained = tandemctl("drain", "d-0", "--reason", "disk errors", endpoint=fleet, env={"TANDEM_ADMIN_TOKEN": TOKEN})
    assert (drained.code, drained.out.strip()) == (0, "worker d-0 is draining (reason: disk errors)"), drained.err
    (worker,) = tandemctl("workers", "-o", "json", endpoint=fleet).json()["workers"]
    assert worker["drain"]["reason"] == "disk errors" and worker["routable"] is False

    undone = tandemctl("--token", TOKEN, "drain", "d-0", "--undo", endpoint=fleet)
    assert (undone.code, undone.out.strip()) == (0, "drain of worker d-0 withdrawn")

    missing = tandemctl("--token", TOKEN, "drain", "nobody", endpoint=fleet)
    assert (missing.code, missing.err.strip()) == (5, "tandemctl: worker 'nobody' is not registered")

    cordoned = tandemctl("--token", TOKEN, "cordon", "gpu-1", "--reason", "maintenance", endpoint=fleet)
    assert (cordoned.code, cordoned.out.strip()) == (0, "node gpu-1 cordoned (reason: maintenance)")
    assert tandemctl("nodes", "-o", "json", endpoint=fleet).json()["nodes"][0]["cordoned"] is True
    assert tandemctl("--token", TOKEN, "uncordon", "gpu-1", endpoint=fleet).out.strip() == "node gpu-1 uncordoned"

    put = tandemctl("--token", TOKEN, "models", "put", "tiny-chat", "--checkpoint", "tiny", "--prefill", "2",
                    "--decode", "3", "--ttft-ms", "250", "--max-context", "2048", "--max-output", "256",
                    endpoint=fleet)
    assert put.code == 0, put.err
    (spec,) = tandemctl("models", "-o", "json", endpoint=fleet).json()["models"]
    assert (spec["name"], spec["desiredPrefillWorkers"], spec["desiredDecodeWorkers"], spec["slo"]["ttftMs"]) == (
        "tiny-chat", 2, 3, 250)
    bad = tandemctl("--token", TOKEN, "models", "put", "tiny-chat", "--checkpoint", "tiny", "--max-context", "10",
                    "--max-output", "20", endpoint=fleet)
    assert bad.code == 1 and bad.err.startswith("tandemctl: spec.max_output_tokens must be at most max_context_tokens")
    assert tandemctl("--token", TOKEN, "models", "delete", "tiny-chat", endpoint=fleet).code == 0
    assert tandemctl("--token", TOKEN, "models", "delete", "tiny-chat", endpoint=fleet).code == 5


def test_unreachable_endpoint_fails_with_one_helpful_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"  # free once closed: nothing listens there
    result = tandemctl("status", endpoint=endpoint)
    assert result.code == 3 and result.out == ""
    assert result.err.splitlines() == [
        f"tandemctl: cannot reach the control plane at {endpoint} (UNAVAILABLE: connection refused). "
        "Is tandem-controlplane running there? Set --endpoint or TANDEM_ENDPOINT."]


def test_version() -> None:
    from runtime import __version__

    assert tandemctl("--version").out.strip() == f"tandemctl {__version__}"
    assert tandemctl("version").out.strip() == f"tandemctl {__version__}"
