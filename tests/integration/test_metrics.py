"""Every process serves Prometheus /metrics: the expected series exist, and counters move with traffic;
the metrics port answers /healthz and nothing else."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.etcd_server import EtcdServer
from tests.support.metrics_fleet import MODEL, get, send_traffic, start_metrics_fleet

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
    ports, router = start_metrics_fleet(etcd, processes)
    before = scrape(ports["router"])
    await send_traffic(router.endpoint)

    router_after = scrape(ports["router"])
    assert total(router_after, "tandem_router_requests_total", status="OK", model=MODEL) \
        - total(before, "tandem_router_requests_total", status="OK", model=MODEL) == 2
    assert total(router_after, "tandem_router_requests_total", status="NOT_FOUND") >= 1
    assert total(router_after, "tandem_router_generated_tokens_total", model=MODEL) >= 12
    assert total(router_after, "tandem_router_ttft_seconds_count", model=MODEL) >= 2
    assert total(router_after, "tandem_router_decisions_total", reason="short-prompt", model=MODEL) >= 1

    prefill_metrics, decode_metrics = scrape(ports["p0"]), scrape(ports["d0"])
    # Counters carry the labels the gauges carry, so the two join.
    mine = {"role": "prefill", "worker_id": "p0", "model": MODEL}
    assert total(prefill_metrics, "tandem_worker_requests_total", rpc="Prefill", status="OK", **mine) >= 1
    assert total(prefill_metrics, "tandem_worker_kv_exported_bytes_total", **mine) > 0
    assert total(prefill_metrics, "tandem_worker_prefill_seconds_count", **mine) >= 1
    assert [dict(k) for k in prefill_metrics["tandem_worker_active_requests"]] == [mine]
    decode = {"role": "decode", "worker_id": "d0", "model": MODEL}
    # A Decode RPC is counted as its handler exits, which may be just after the router's reply.
    deadline = time.monotonic() + 10
    while total(decode_metrics, "tandem_worker_requests_total", rpc="Decode", status="OK", **decode) < 2 \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        decode_metrics = scrape(ports["d0"])
    assert total(decode_metrics, "tandem_worker_requests_total", rpc="Decode", status="OK", **decode) == 2, \
        decode_metrics.get("tandem_worker_requests_total")
    assert total(decode_metrics, "tandem_worker_kv_transfer_bytes_total", **decode) > 0
    assert total(decode_metrics, "tandem_worker_generated_tokens_total", **decode) >= 10
    assert total(decode_metrics, "tandem_worker_kv_blocks_capacity", **decode) > 0
    assert 0 <= total(decode_metrics, "tandem_worker_prefix_cache_hit_ratio", **decode) <= 1
    assert "tandem_worker_active_sequences" in decode_metrics

    gpu = scrape(ports["agent"])
    assert total(gpu, "tandem_gpu_memory_total_bytes", node="metrics-node") == 2 * 80e9
    assert all(0 <= v <= 1 for v in gpu.get("tandem_gpu_utilization_ratio", {}).values())
    cp = scrape(ports["cp"])
    assert cp["tandem_controlplane_is_leader"] == {(("replica", "cp-a"),): 1}

    scraped = {name: scrape(port) for name, port in ports.items()}
    created = {series for samples in scraped.values() for series in samples if series.endswith("_created")}
    assert not created, f"_created series are exported: {sorted(created)}"

    # Every tandem_* series the dashboard charts is exported by some process.
    exported = set().union(*(samples.keys() for samples in scraped.values()))
    wanted = set(re.findall(r"\b(tandem_[a-z_]+?)(?:_bucket)?\b", json.dumps(json.loads(DASHBOARD.read_text()))))
    missing = {name for name in wanted if name not in exported and f"{name}_bucket" not in exported}
    assert not missing, f"dashboard series no process exports: {sorted(missing)}"

    # The metrics port serves /metrics and /healthz, and 404 for anything else.
    for name, port in ports.items():
        assert get(port, "/healthz") == (200, "ok\n"), name
        for path in ("/", "/v1/models", "/metricsx", "/healthz/x"):
            assert get(port, path)[0] == 404, (name, path)
