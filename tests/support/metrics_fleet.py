"""One process of every kind with a metrics port, and traffic that touches every labelled series.

    ports, router = start_metrics_fleet(etcd, processes)   # name -> metrics port; the router child
    await send_traffic(router.endpoint)                    # two answered requests, one NOT_FOUND

Shared by tests/integration/test_metrics.py (the series exist and move) and
tests/integration/test_promtool.py (the text passes `promtool check metrics`).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import grpc

from controlplane.etcd_server import EtcdServer
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

MODEL = "llama-3-8b"


def start_metrics_fleet(etcd: EtcdServer, processes: Any) -> tuple[dict[str, int], Any]:
    """Agent, control plane, prefill, decode and router on free ports; returns ({name: metrics port}, router)."""
    common = ("--etcd", etcd.endpoint, "--lease-ttl", "2", "--metrics-listen", "127.0.0.1:0")
    sim = ("--engine", "sim", "--model", MODEL, "--gpu-type", "H100-SXM", "--speedup", "1000",
           "--listen", "127.0.0.1:0", "--node", "metrics-node")
    children = {
        "agent": processes.start("agent", "controlplane.agent", *common, "--node", "metrics-node",
                                 "--simulate-gpus", "H100-SXM:2"),
        "cp": processes.start("cp", "controlplane.server", *common, "--listen", "127.0.0.1:0",
                              "--replica-id", "cp-a"),
        "p0": processes.start("p0", "prefill_svc", *common, *sim, "--worker-id", "p0", "--gpu-uuids",
                              "SIM-metrics-node-0"),
        "d0": processes.start("d0", "decode_svc", *common, *sim, "--worker-id", "d0", "--gpu-uuids",
                              "SIM-metrics-node-1"),
        "router": processes.start("router", "router_svc", *common, "--listen", "127.0.0.1:0",
                                  "--local-prefill-max-prompt-tokens", "4"),
    }
    ports = {name: child.info["metrics_port"] for name, child in children.items()}
    assert all(ports.values()), ports
    return ports, children["router"]


async def send_traffic(endpoint: str) -> None:
    """One prompt long enough for a KV transfer, one prefilled locally, one for an unknown model."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for text in ("a prompt long enough for a KV transfer", "hi"):
            reply = await stub.Complete(inference_pb2.GenerateRequest(
                model=MODEL, prompt=text, sampling=common_pb2.SamplingParams(max_tokens=6)), timeout=30)
            assert len(reply.token_ids) == 6
        try:
            await stub.Complete(inference_pb2.GenerateRequest(model="nope", prompt="x"), timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        else:
            raise AssertionError("a request for an unknown model was answered")


def get(port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of GET 127.0.0.1:port/path; an error status is returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
