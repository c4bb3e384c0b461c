"""Every process serves Prometheus /metrics: the expected series exist, and counters move with traffic."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.etcd_server import EtcdServer
from tandem.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tandem-dashboard.json"


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted label pairs: value} for every sample at 127.0.0.1:port/metrics.

    Declared families without samples yet (a labelled counter nobody
    incremented, a GPU reading a simulated GPU lacks) appear with no values.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        samples.setdefault(family.name + ("_total" if family.type == "counter" else ""), {})
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return sum(v for k, v in samples.get(name, {}).items() if all((key, val) in k for key, val in labels.items()))


async def test_every_process_exports_its_series(etcd: EtcdServer, processes) -> None:  # type: ignore[no-untyped-def]
    common = ("--etcd", etcd.endpoint, "--lease-ttl", "2", "--metrics-listen", "127.0.0.1:0")
    sim = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM", "--speedup", "1000",
           "--listen", "127.0.0.1:0", "--node", "metrics-node")
    agent = processes.start("agent", "controlplane.agent", *common, "--node", "metrics-node",
                            "--simulate-gpus", "H100-SXM:2")
    controlplane = processes.start("cp", "controlplane.server", *common, "--listen", "127.0.0.1:0")
    prefill = processes.start("p0", "prefill_svc", *common, *sim, "--worker-id", "p0", "--gpu-uuids",
                              "SIM-metrics-node-0")
    decode = processes.start("d0", "decode_svc", *common, *sim, "--worker-id", "d0", "--gpu-uuids",
                             "SIM-metrics-node-1")
    router = processes.start("router", "router_svc", *common, "--listen", "127.0.0.1:0",
                             "--local-prefill-max-prompt-tokens", "4")
    ports = {name: child.info["metrics_port"] for name, child in
             {"agent": agent, "cp": controlplane, "p0": prefill, "d0": decode, "router": router}.items()}
    assert all(ports.values()), ports

    async with grpc.aio.insecure_channel(router.endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        before = scrape(ports["router"])
        for text in ("a prompt long enough for a KV transfer", "hi"):
            reply = await stub.Complete(inference_pb2.GenerateRequest(
                model="llama-3-8b", prompt=text, sampling=common_pb2.SamplingParams(max_tokens=6)), timeout=30)
            assert len(reply.token_ids) == 6
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Complete(inference_pb2.GenerateRequest(model="nope", prompt="x"), timeout=10)

    router_after = scrape(ports["router"])
    assert total(router_after, "tandem_router_requests_total", status="ok") \
        - total(before, "tandem_router_requests_total", status="ok") == 2
    assert total(router_after, "tandem_router_requests_total", status="NOT_FOUND") >= 1
    assert total(router_after, "tandem_router_generated_tokens_total") >= 12
    assert total(router_after, "tandem_router_ttft_seconds_count") >= 2
    assert total(router_after, "tandem_router_decisions_total", reason="short-prompt") >= 1

    prefill_metrics, decode_metrics = scrape(ports["p0"]), scrape(ports["d0"])
    assert total(prefill_metrics, "tandem_worker_requests_total", rpc="Prefill", status="OK") >= 1
    assert total(prefill_metrics, "tandem_worker_kv_exported_bytes_total") > 0
    assert total(decode_metrics, "tandem_worker_kv_transfer_bytes_total") > 0
    assert total(decode_metrics, "tandem_worker_generated_tokens_total") >= 10
    assert total(decode_metrics, "tandem_worker_kv_blocks_total", worker_id="d0") > 0
    assert "tandem_worker_active_sequences" in decode_metrics

    gpu = scrape(ports["agent"])
    assert total(gpu, "tandem_gpu_memory_total_bytes", node="metrics-node") == 2 * 80e9
    cp = scrape(ports["cp"])
    assert total(cp, "tandem_controlplane_is_leader") == 1

    # Every tandem_* series the dashboard charts is exported by some process.
    exported = set().union(*(scrape(port).keys() for port in ports.values()))
    wanted = set(re.findall(r"\b(tandem_[a-z_]+?)(?:_bucket)?\b", json.dumps(json.loads(DASHBOARD.read_text()))))
    missing = {name for name in wanted if name not in exported and f"{name}_bucket" not in exported}
    assert not missing, f"dashboard series no process exports: {sorted(missing)}"
