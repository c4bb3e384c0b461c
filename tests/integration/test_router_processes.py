"""`tandem-router --processes 2` against real etcd and a real sim worker: one address, two routers behind it.

Each request below opens its own connection (a fresh gRPC channel, an HTTP
request without keep-alive): SO_REUSEPORT spreads connections, not requests,
over the routers. No request is retried: a failure fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.supervisor import ManagedProcess
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.support.polling import wait_until
from tests.support.testbed import Testbed

pytestmark = pytest.mark.integration

SIM = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM", "--speedup", "1000")
# Connections per batch: all landing on one of two routers has odds 2 * 2**-24.
CONNECTIONS = 24


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Testbed]:
    testbed = Testbed(tmp_path, extra_args=("--log-format", "json"))
    yield testbed
    assert not testbed.close(), "children left running"


def alive(pid: int) -> bool:
    """Some thread of `pid` still runs. A killed process's main thread can be a zombie while others are
    still exiting, its sockets open: gone means every thread gone (or a zombie waiting for its parent)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except FileNotFoundError:
            continue
    return False


def ready_info(router: ManagedProcess) -> dict[str, Any]:
    assert router.ready_path is not None
    info: dict[str, Any] = json.loads(router.ready_path.read_text())
    return info


def grpc_complete(endpoint: str) -> None:
    # Its own subchannel: a new connection, not one shared with an earlier channel to the same address.
    with grpc.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).Complete(inference_pb2.GenerateRequest(
            model="llama-3-8b", prompt="hello", sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)),
            timeout=60)
    assert len(reply.token_ids) == 4


def http_complete(port: int) -> None:
    body = json.dumps({"model": "llama-3-8b", "prompt": "hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", "Connection": "close"})
    with urllib.request.urlopen(request, timeout=60) as response:  # urllib opens a connection per request
        assert response.status == 200
        assert json.loads(response.read())["usage"]["completion_tokens"] == 4


def requests_served(metrics_port: int) -> float:
    """tandem_router_requests_total summed over its labels, from one router's metrics port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tandem_router_requests_total{"))


def load(info: dict[str, Any]) -> None:
    for _ in range(CONNECTIONS):
        grpc_complete(info["endpoint"])
        http_complete(info["http_port"])


def start_router(bed: Testbed) -> ManagedProcess:
    bed.start("d0", "decode_svc", *SIM)
    return bed.start("router", "router_svc", "--processes", "2", "--http-listen", "127.0.0.1:0",
                     "--metrics-listen", "127.0.0.1:0")


def test_two_processes_share_the_ports_survive_a_crash_and_stop_cleanly(bed: Testbed) -> None:
    router = start_router(bed)
    info = ready_info(router)
    assert info["processes"] == 2 and len(info["children"]) == 2 and len(set(info["metrics_ports"])) == 2
    assert info["metrics_port"] == info["metrics_ports"][0] and info["http_port"] and info["pid"] == router.pid

    load(info)
    served = [requests_served(port) for port in info["metrics_ports"]]
    assert sum(served) == 2 * CONNECTIONS and all(served), f"requests per router: {served}"

    # A router crashes: new connections go to the one left, and the supervisor starts a new one.
    victim = info["children"][0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), "the killed router gone")
    load(info)

    def replaced() -> dict[str, Any] | None:
        now = ready_info(router)
        return now if now["children"][0] != victim else None

    restarted = wait_until(replaced, "the killed router restarted")
    assert '"msg": "router process died: restarting it"' in router.log_tail(200)
    assert restarted["children"][1] == info["children"][1] and restarted["endpoint"] == info["endpoint"]
    assert restarted["http_port"] == info["http_port"]
    load(restarted)
    assert requests_served(restarted["metrics_ports"][0]) > 0, "the restarted router serves"

    # SIGTERM to the supervisor: every router drains and exits, and so does it, cleanly.
    assert router.stop() == 0
    assert not [pid for pid in restarted["children"] if alive(pid)]


def test_routers_do_not_outlive_a_killed_supervisor(bed: Testbed) -> None:
    router = start_router(bed)
    children = ready_info(router)["children"]
    router.kill()
    wait_until(lambda: not any(alive(pid) for pid in children), "every router gone with its supervisor")
