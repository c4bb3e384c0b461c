"""Writes tandem-dashboard.json, the Grafana dashboard over Tandem's Prometheus series.

    python deploy/grafana/build_dashboard.py    # after changing a panel here

Import the JSON in Grafana (Dashboards > Import) and pick your Prometheus
data source for the `datasource` variable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_OUTPUT = Path(__file__).with_name("tandem-dashboard.json")

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int, w: int = 12, h: int = 8,
          kind: str = "timeseries", defaults: dict[str, object] | None = None) -> dict[str, object]:
    return {
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
                    for i, (expr, legend) in enumerate(exprs)],
    }


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[5m])))", f"p{int(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


def row(title: str, y: int) -> dict[str, object]:
    return {"type": "row", "title": title, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "collapsed": False}


def build() -> dict[str, object]:
    panels = [
        row("Requests (routers)", 0),
        panel("Requests/s by model and status",
              [("sum by (model, status) (rate(tandem_router_requests_total[1m]))", "{{model}} {{status}}")],
              "reqps", 0, 1),
        panel("Tokens/s streamed by model",
              [("sum by (model) (rate(tandem_router_generated_tokens_total[1m]))", "{{model}}")], "short", 12, 1),
        panel("Time to first token", quantiles("tandem_router_ttft_seconds"), "s", 0, 9),
        panel("Inter-token latency", quantiles("tandem_router_inter_token_seconds"), "s", 12, 9),
        panel("End-to-end", quantiles("tandem_router_request_seconds"), "s", 0, 17),
        panel("Queue time", quantiles("tandem_router_queue_seconds"), "s", 12, 17),
        panel("Routing decisions by reason",
              [("sum by (reason) (rate(tandem_router_decisions_total[5m]))", "{{reason}}")], "ops", 0, 25),
        panel("Retries and migrations", [("sum(rate(tandem_router_retries_total[5m]))", "retries"),
                                         ("sum(rate(tandem_router_migrations_total[5m]))", "migrations")],
              "ops", 12, 25),
        row("Workers", 33),
        panel("Active sequences", [("sum by (worker_id) (tandem_worker_active_sequences)", "{{worker_id}}")],
              "short", 0, 34),
        panel("Queued prefill tokens",
              [("sum by (worker_id) (tandem_worker_queued_prefill_tokens)", "{{worker_id}}")], "short", 12, 34),
        panel("KV cache in use",
              [("tandem_worker_kv_blocks_used / tandem_worker_kv_blocks_capacity", "{{worker_id}}")],
              "percentunit", 0, 42),
        panel("KV transfer throughput",
              [("sum by (transport) (rate(tandem_worker_kv_transfer_bytes_total[1m]))", "{{transport}}")],
              "Bps", 12, 42),
        panel("KV transfer time", quantiles("tandem_worker_kv_transfer_seconds", "transport"), "s", 0, 50),
        panel("Open KV handles", [("sum by (worker_id) (tandem_worker_open_kv_handles)", "{{worker_id}}")],
              "short", 12, 50),
        row("GPUs (node agents)", 58),
        panel("GPU utilisation", [("tandem_gpu_utilization_ratio", "{{node}}/{{gpu}} {{catalog_id}}")],
              "percentunit", 0, 59),
        panel("GPU memory used",
              [("tandem_gpu_memory_used_bytes / tandem_gpu_memory_total_bytes", "{{node}}/{{gpu}}")],
              "percentunit", 12, 59),
        panel("GPU health (1 ok, 2 degraded, 3 failed)", [("max by (node, gpu) (tandem_gpu_health)",
                                                          "{{node}}/{{gpu}}")], "short", 0, 67),
        panel("GPU power", [("tandem_gpu_power_watts", "{{node}}/{{gpu}}")], "watt", 12, 67),
        row("Control plane", 75),
        panel("Leader (1 = leads)", [("max by (replica) (tandem_controlplane_is_leader)", "{{replica}}")], "short",
              0, 76, w=8),
        panel("Health verdicts/s", [("sum by (status) (rate(tandem_controlplane_verdicts_total[5m]))",
                                     "{{status}}")], "ops", 8, 76, w=8),
        panel("Probe latency", quantiles("tandem_controlplane_probe_seconds"), "s", 16, 76, w=8),
        panel("Registry view staleness", [("max(tandem_controlplane_view_staleness_seconds)", "staleness")],
              "s", 0, 84),
        # Exactly one leader is healthy; 0 means no prober runs, 2 means a split brain.
        panel("Leaders (should be 1)", [("sum(tandem_controlplane_is_leader)", "leaders")], "short", 12, 84,
              kind="stat", defaults={"thresholds": {"mode": "absolute", "steps": [
                  {"color": "red", "value": None}, {"color": "green", "value": 1}, {"color": "red", "value": 2}]}}),
        row("Role planner (leader)", 92),
        panel("Predicted goodput within SLO",
              [("max by (model, assignment) (tandem_planner_predicted_goodput_rps)", "{{model}} {{assignment}}"),
               ("max by (model) (tandem_planner_demand_arrival_rps)", "{{model}} arrivals")], "reqps", 0, 93),
        panel("Planned workers by role and switches",
              [("max by (model, role) (tandem_planner_planned_workers)", "{{model}} {{role}}"),
               ("sum by (model, role) (increase(tandem_planner_switches_total[15m]))", "{{model}} to {{role}}")],
              "short", 12, 93),
    ]
    for i, p in enumerate(panels):
        p["id"] = i + 1
    return {
        "title": "Tandem",
        "uid": "tandem-overview",
        "tags": ["tandem", "inference"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the Grafana dashboard over Tandem's Prometheus series (run it after changing a panel "
                    "in this file).",
        epilog="Import the JSON in Grafana (Dashboards > Import) and pick the Prometheus data source.")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    args.output.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
