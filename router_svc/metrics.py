"""The router's Prometheus series (tandem_router_*).

Every series carries the served `model` (empty for a request rejected before a
served model was resolved: an unknown name, or bad arguments); statuses are
gRPC code names (`OK`, `INVALID_ARGUMENT`...), as the workers' are, whichever
front (gRPC or HTTP) the request came through. The request-time histogram
carries each request's id as an OpenMetrics exemplar (scrape with
`Accept: application/openmetrics-text`), the id its log lines carry.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from router_svc.pipeline import Outcome
from runtime.metrics import Series

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

class RouterMetrics:
    """Created once per process (prometheus-client registers series globally)."""

    def __init__(self) -> None:
        self.requests = Series(Counter("tandem_router_requests", "Requests by model and final gRPC status",
                                       ["model", "status"]))
        self.e2e = Series(Histogram("tandem_router_request_seconds", "End-to-end request time", ["model"],
                                    buckets=_LATENCY_BUCKETS))
        self.ttft = Series(Histogram("tandem_router_ttft_seconds", "Time to first token", ["model"],
                                     buckets=_LATENCY_BUCKETS))
        self.inter_token = Series(Histogram("tandem_router_inter_token_seconds",
                                            "Mean inter-token latency per request", ["model"],
                                            buckets=_LATENCY_BUCKETS))
        self.queue = Series(Histogram("tandem_router_queue_seconds", "Queue time (router and worker)", ["model"],
                                      buckets=_LATENCY_BUCKETS))
        self.kv_transfer = Series(Histogram("tandem_router_kv_transfer_seconds", "KV cache transfer time",
                                            ["model"], buckets=_LATENCY_BUCKETS))
        self.retries = Series(Counter("tandem_router_retries",
                                      "Worker calls retried elsewhere before the first token", ["model"]))
        self.migrations = Series(Counter("tandem_router_migrations", "Sequences moved to a new pair mid-stream",
                                         ["model"]))
        self.decisions = Series(Counter("tandem_router_decisions", "Routing decisions by reason",
                                        ["model", "reason"]))
        self.tokens = Series(Counter("tandem_router_generated_tokens", "Tokens streamed to clients", ["model"]))
        # The HTTP front's answers by endpoint and HTTP status (its requests are in tandem_router_requests too).
        self.http_requests = Series(Counter("tandem_router_http_requests", "OpenAI-compatible HTTP API answers",
                                            ["path", "status"]))

    def observe(self, outcome: Outcome, model: str) -> None:
        self.ttft.labels(model).observe(outcome.ttft_ms / 1000)
        if outcome.mean_inter_token_ms:
            self.inter_token.labels(model).observe(outcome.mean_inter_token_ms / 1000)
        self.queue.labels(model).observe(outcome.queue_ms / 1000)
        if outcome.kv_transfer_ms:
            self.kv_transfer.labels(model).observe(outcome.kv_transfer_ms / 1000)
        self.retries.labels(model).inc(outcome.retries)
        self.migrations.labels(model).inc(outcome.migrations)
        self.decisions.labels(model, outcome.reason or "none").inc()
        self.tokens.labels(model).inc(outcome.completion_tokens)
