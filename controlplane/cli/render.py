"""Admin API responses -> rich tables or JSON text. Pure: no I/O, time comes in as `now_ms`.

JSON is the canonical proto3 JSON of the response (google.protobuf.json_format)
with every non-optional field present, keys sorted: stable for scripts. An
optional reading that is absent (a GPU without a power sensor) stays absent,
and shows as "-" in tables: it means "not available", not zero.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable

from google.protobuf import json_format
from google.protobuf.message import Message
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from tandem.v1 import admin_pb2, common_pb2, registry_pb2

DASH = "-"


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, always_print_fields_with_no_presence=True, sort_keys=True, indent=2)


def render_text(renderable: RenderableType, width: int = 160) -> str:
    """Plain text of a renderable (no colour), as a script or a test sees it."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, highlight=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


# -- small formats ----------------------------------------------------------------------------------

def role_name(role: common_pb2.Role.ValueType) -> str:
    return common_pb2.Role.Name(role).removeprefix("ROLE_").lower() if role else DASH


def state_name(state: registry_pb2.WorkerState.ValueType) -> str:
    return registry_pb2.WorkerState.Name(state).removeprefix("WORKER_STATE_").lower() if state else DASH


def health_name(health: registry_pb2.GpuHealth.ValueType) -> str:
    return registry_pb2.GpuHealth.Name(health).removeprefix("GPU_HEALTH_").lower() if health else DASH


def serving_name(status: registry_pb2.ServingStatus.ValueType) -> str:
    return registry_pb2.ServingStatus.Name(status).removeprefix("SERVING_STATUS_").lower() if status else DASH


def age(at_ms: int, now_ms: int) -> str:
    """Time since `at_ms` like "42s", "5m", "3h", "2d"; "-" when unset."""
    if not at_ms:
        return DASH
    seconds = max(0, (now_ms - at_ms) // 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def _opt(message: Message, name: str, fmt: str = "{}") -> str:
    return fmt.format(getattr(message, name)) if message.HasField(name) else DASH


def _table(*columns: str, title: str = "") -> Table:
    table = Table(*columns, box=box.SIMPLE_HEAD, title=title or None, title_justify="left", pad_edge=False)
    return table


def _or_none(table: Table, what: str) -> RenderableType:
    """The table, or one line saying there is nothing (an empty grid reads like a broken command)."""
    return table if table.row_count else Text(f"no {what}")


def _with_reason(word: str, reason: str) -> str:
    return f"{word}: {reason}" if reason else word


def gpu_mix(gpus: Iterable[registry_pb2.GpuInfo]) -> str:
    """GPU mix like "4x H100-SXM, 1x L4"; NVML names stand in for models the catalog does not know."""
    counts = Counter(gpu.catalog_id or gpu.name or "unknown" for gpu in gpus)
    return ", ".join(f"{n}x {model}" for model, n in counts.items()) or "none"


def _node_health(gpus: Iterable[registry_pb2.GpuInfo]) -> str:
    counts = Counter(gpu.health for gpu in gpus)
    bad = [f"{counts[h]} {health_name(h)}" for h in (registry_pb2.GPU_HEALTH_FAILED, registry_pb2.GPU_HEALTH_DEGRADED)
           if counts[h]]
    return ", ".join(bad) or "ok"


# -- responses --------------------------------------------------------------------------------------

def fleet_status(response: admin_pb2.FleetStatusResponse, now_ms: int) -> RenderableType:
    table = _table("GPU MODEL", "TOTAL", "PREFILL", "DECODE", "UNIFIED", "IDLE", "UNHEALTHY", "SIMULATED")
    for column in table.columns[1:]:
        column.justify = "right"
    totals = [0] * 7
    for row in response.gpu_models:
        values = [row.total, row.prefill, row.decode, row.unified, row.idle, row.unhealthy, row.simulated]
        totals = [a + b for a, b in zip(totals, values, strict=True)]
        table.add_row(row.gpu_model, *map(str, values))
    if len(response.gpu_models) != 1:
        table.add_section()
        table.add_row("all", *map(str, totals))
    if response.view_staleness_s == 0:
        view = "live"
    elif math.isinf(response.view_staleness_s):
        view = "never synced with etcd"
    else:
        view = f"stale {response.view_staleness_s:.1f}s (etcd not answering)"
    leader = response.leader
    leader_text = (f"{leader.replica_id} at {leader.endpoint}, since {age(leader.since_unix_ms, now_ms)}"
                   if leader.replica_id else "none")
    lines = [
        f"nodes    {response.nodes} ({response.cordoned_nodes} cordoned)",
        f"workers  {response.workers} ({response.workers_ready} ready, {response.workers_draining} draining, "
        f"{response.workers_not_serving} not serving)",
        f"leader   {leader_text}",
        f"view     {view}, revision {response.revision}, answered by {response.answered_by or DASH}",
    ]
    return Group(table, Text("\n".join(lines)))


def nodes(response: admin_pb2.ListNodesResponse, now_ms: int) -> RenderableType:
    table = _table("NODE", "HOST", "GPUS", "HEALTH", "SIMULATED", "CORDONED", "DRIVER", "LABELS", "UPDATED")
    for status in response.nodes:
        record = status.record
        cordon = _with_reason("yes", status.cordon.reason) if status.cordoned else "no"
        labels = ",".join(f"{k}={v}" for k, v in sorted(record.labels.items())) or DASH
        driver = record.driver_version or (record.inventory_note and "(no driver)") or DASH
        table.add_row(record.node, record.host or DASH, gpu_mix(record.gpus), _node_health(record.gpus),
                      "yes" if record.simulated else "no", cordon, driver, labels,
                      age(record.updated_at_unix_ms, now_ms))
    notes = [f"{s.record.node}: {s.record.inventory_note}" for s in response.nodes if s.record.inventory_note]
    return Group(table, Text("\n".join(notes))) if notes else _or_none(table, "nodes registered")


def gpus(response: admin_pb2.ListGpusResponse) -> RenderableType:
    table = _table("NODE", "IDX", "MODEL", "UUID", "MEM GiB", "UTIL%", "TEMP", "POWER W", "HEALTH", "WORKER", "ROLE")
    for status in response.gpus:
        gpu = status.gpu
        model = gpu.catalog_id or gpu.name or DASH
        if status.simulated:
            model += " (sim)"
        memory = f"{gib(gpu.memory_used_bytes)}/{gib(gpu.memory_total_bytes)}" if gpu.memory_total_bytes else DASH
        table.add_row(status.node, str(gpu.index), model, gpu.uuid or DASH, memory, _opt(gpu, "utilization_percent"),
                      _opt(gpu, "temperature_c", "{}C"), _opt(gpu, "power_w", "{:.0f}"),
                      _with_reason(health_name(gpu.health), gpu.health_reason), status.worker_id or DASH,
                      role_name(status.role) if status.worker_id else DASH)
    return _or_none(table, "GPUs registered")


def workers(response: admin_pb2.ListWorkersResponse, now_ms: int) -> RenderableType:
    table = _table("WORKER", "ROLE", "MODEL", "NODE", "GPUS", "ENGINE", "STATE", "HEALTH", "ROUTABLE", "ENDPOINT",
                   "AGE")
    for status in response.workers:
        record = status.record
        gpus_text = f"{record.gpu_count}x {record.gpu_type}" if record.gpu_count else (record.gpu_type or DASH)
        if record.simulated:
            gpus_text += " (sim)"
        state = state_name(record.state)
        if status.HasField("drain") and record.state != registry_pb2.WORKER_STATE_DRAINING:
            state += " (drain requested)"
        health = (_with_reason(serving_name(status.health.status), status.health.reason)
                  if status.HasField("health") else "not probed")
        routable = "yes" if status.routable else ("no (node cordoned)" if status.node_cordoned else "no")
        table.add_row(record.worker_id, role_name(record.role), record.model or DASH, record.node or DASH, gpus_text,
                      record.engine or DASH, state, health, routable, record.endpoint or DASH,
                      age(record.started_at_unix_ms, now_ms))
    return _or_none(table, "workers registered")


def leases(response: admin_pb2.ListLeasesResponse) -> RenderableType:
    table = _table("LEASE", "HOLDER", "TTL", "KEYS")
    for lease in response.leases:
        remaining = "expired" if lease.remaining_ttl_s < 0 else f"{lease.remaining_ttl_s}s"
        table.add_row(f"{lease.lease_id:016x}", lease.holder or DASH, f"{remaining} of {lease.granted_ttl_s}s",
                      "\n".join(lease.keys) or DASH)
    return _or_none(table, "leases")


def models(response: admin_pb2.ListModelSpecsResponse) -> RenderableType:
    table = _table("MODEL", "CHECKPOINT", "TOKENIZER", "PREFILL", "DECODE", "TTFT ms", "ITL ms", "MAX CONTEXT",
                   "MAX OUTPUT")
    for spec in response.models:
        table.add_row(spec.name, spec.checkpoint or DASH, spec.tokenizer or "(checkpoint's)",
                      str(spec.desired_prefill_workers), str(spec.desired_decode_workers),
                      f"{spec.slo.ttft_ms:g}" if spec.slo.ttft_ms else DASH,
                      f"{spec.slo.inter_token_ms:g}" if spec.slo.inter_token_ms else DASH,
                      str(spec.max_context_tokens or DASH), str(spec.max_output_tokens or DASH))
    return _or_none(table, "model specs")


# -- mutation confirmations -------------------------------------------------------------------------

def drained(response: admin_pb2.DrainWorkerResponse) -> str:
    intent = response.intent
    return f"worker {intent.worker_id} is draining" + (f" (reason: {intent.reason})" if intent.reason else "")


def undrained(worker_id: str, response: admin_pb2.UndrainWorkerResponse) -> str:
    return (f"drain of worker {worker_id} withdrawn" if response.removed
            else f"worker {worker_id} had no drain request")


def cordoned(response: admin_pb2.CordonNodeResponse) -> str:
    intent = response.intent
    return f"node {intent.node} cordoned" + (f" (reason: {intent.reason})" if intent.reason else "")


def uncordoned(node: str, response: admin_pb2.UncordonNodeResponse) -> str:
    return f"node {node} uncordoned" if response.removed else f"node {node} was not cordoned"
