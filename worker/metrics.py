"""A worker's Prometheus series (tandem_worker_*).

Gauges are read from the engine and admission at scrape time (a collector,
so nothing polls); counters and histograms are updated by the servicers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tandem.v1 import worker_pb2

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BYTES_BUCKETS = tuple(float(2**p) for p in range(16, 34, 2))


class _LoadCollector(Collector):
    def __init__(self, snapshot: Callable[[], worker_pb2.LoadReport], labels: dict[str, str]) -> None:
        self._snapshot = snapshot
        self._labels = labels

    def describe(self) -> list[GaugeMetricFamily]:
        # Registration must not call the snapshot: the worker is still being built then.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self._snapshot()
        names, values = list(self._labels), list(self._labels.values())
        for name, help_text, value in (
            ("tandem_worker_active_requests", "Requests accepted and not finished", report.active_requests),
            ("tandem_worker_active_sequences", "Sequences holding KV on this worker", report.active_sequences),
            ("tandem_worker_queued_prefill_tokens", "Prompt tokens waiting for prefill", report.queued_prefill_tokens),
            ("tandem_worker_kv_blocks_used", "KV cache blocks in use", report.kv_blocks_used),
            ("tandem_worker_kv_blocks_total", "KV cache blocks in all", report.kv_blocks_total),
            ("tandem_worker_open_kv_handles", "Exported KV handles not yet released", report.open_kv_handles),
            ("tandem_worker_draining", "1 while the worker takes no new requests", int(report.draining)),
            ("tandem_worker_prefix_cache_hit_rate", "Prefix-cache hit rate over the lifetime",
             report.prefix_cache_hit_rate),
        ):
            family = GaugeMetricFamily(name, help_text, labels=names)
            family.add_metric(values, value)
            yield family


class WorkerMetrics:
    """Created once per worker process."""

    def __init__(self, role: str, worker_id: str, snapshot: Callable[[], worker_pb2.LoadReport]) -> None:
        labels = {"role": role, "worker_id": worker_id}
        REGISTRY.register(_LoadCollector(snapshot, labels))
        self.requests = Counter("tandem_worker_requests", "Requests by RPC and final status", ["rpc", "status"])
        self.prefill_seconds = Histogram("tandem_worker_prefill_seconds", "Prefill time (engine)", buckets=_BUCKETS)
        self.kv_transfer_seconds = Histogram("tandem_worker_kv_transfer_seconds", "KV cache import time",
                                             ["transport"], buckets=_BUCKETS)
        self.kv_transfer_bytes = Counter("tandem_worker_kv_transfer_bytes", "KV cache bytes imported", ["transport"])
        self.kv_exported_bytes = Counter("tandem_worker_kv_exported_bytes", "KV cache bytes offered to decode workers",
                                         ["transport"])
        self.generated_tokens = Counter("tandem_worker_generated_tokens", "Tokens generated")
