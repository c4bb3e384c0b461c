"""A worker's Prometheus series (tandem_worker_*).

Gauges are read from the engine and admission at scrape time (a collector,
so nothing polls); counters and histograms are updated by the servicers.
Every series carries the worker's `role`, `worker_id` and served `model`, so
a counter and a gauge of one worker join on the same labels. `role` is the
role the worker serves (the record's): a live role switch (worker.role_switcher)
moves new counts to the new role's series, counts
`tandem_worker_role_switches_total{from_role}`, and flips
`tandem_worker_current_role{current_role}` (1 for the role served).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.metrics import Series
from tandem.v1 import common_pb2, worker_pb2

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BYTES_BUCKETS = tuple(float(2**p) for p in range(16, 34, 2))
SWITCH_ROLE_NAMES = {common_pb2.ROLE_PREFILL: "prefill", common_pb2.ROLE_DECODE: "decode"}


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
            ("tandem_worker_kv_blocks_capacity", "KV cache blocks in all", report.kv_blocks_total),
            ("tandem_worker_open_kv_handles", "Exported KV handles not yet released", report.open_kv_handles),
            ("tandem_worker_draining", "1 while the worker takes no new requests", int(report.draining)),
            ("tandem_worker_prefix_cache_hit_ratio", "Prefix-cache hits over lookups in the lifetime, 0..1",
             report.prefix_cache_hit_rate),
        ):
            family = GaugeMetricFamily(name, help_text, labels=names)
            family.add_metric(values, value)
            yield family
        family = GaugeMetricFamily("tandem_worker_current_role",
                                   "1 for the role the worker serves (the target during a switch), 0 for the other",
                                   labels=[*names, "current_role"])
        for role, role_name in SWITCH_ROLE_NAMES.items():
            family.add_metric([*values, role_name], int(report.role == role))
        yield family


_M = TypeVar("_M", Counter, Histogram)


class _Bound(Generic[_M]):
    """A labelled series with the worker's own labels filled in: `.labels(...)` takes only the rest,
    positionally, in the order the metric declares them (after the worker's own)."""

    def __init__(self, metric: _M, fixed: dict[str, str]) -> None:
        self._series: Series[_M] = Series(metric)
        # Shared with WorkerMetrics: set_role() changes the role every series counts under.
        self._fixed = fixed

    def labels(self, *values: str) -> _M:
        return self._series.labels(*self._fixed.values(), *values)


class WorkerMetrics:
    """Created once per worker process."""

    def __init__(self, role: str, worker_id: str, snapshot: Callable[[], worker_pb2.LoadReport],
                 model: str = "") -> None:
        # One dict shared by every series: set_role() changes the role they count under.
        fixed = self._fixed = {"role": role, "worker_id": worker_id, "model": model}
        own = list(fixed)
        REGISTRY.register(_LoadCollector(snapshot, fixed))
        self.requests = _Bound(Counter("tandem_worker_requests", "Requests by RPC and final gRPC status",
                                       [*own, "rpc", "status"]), fixed)
        self._prefill_seconds = Histogram("tandem_worker_prefill_seconds", "Prefill time (engine)", own,
                                          buckets=_BUCKETS)
        self.prefill_seconds = self._prefill_seconds.labels(**fixed)
        self.kv_transfer_seconds = _Bound(Histogram("tandem_worker_kv_transfer_seconds", "KV cache import time",
                                                    [*own, "transport"], buckets=_BUCKETS), fixed)
        self.kv_transfer_bytes = _Bound(Counter("tandem_worker_kv_transfer_bytes", "KV cache bytes imported",
                                                [*own, "transport"]), fixed)
        self.kv_exported_bytes = _Bound(Counter("tandem_worker_kv_exported_bytes",
                                                "KV cache bytes offered to decode workers", [*own, "transport"]),
                                        fixed)
        self._generated_tokens = Counter("tandem_worker_generated_tokens", "Tokens generated", own)
        self.generated_tokens = self._generated_tokens.labels(**fixed)
        self.role_switches = _Bound(Counter("tandem_worker_role_switches", "Live role switches completed, by the "
                                            "role switched from", [*own, "from_role"]), fixed)

    def set_role(self, role: str) -> None:
        """Counts from now on under `role` (a live role switch ended)."""
        self._fixed["role"] = role
        self.prefill_seconds = self._prefill_seconds.labels(**self._fixed)
        self.generated_tokens = self._generated_tokens.labels(**self._fixed)
