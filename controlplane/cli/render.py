"""Admin API responses -> rich tables or JSON text. Pure: no I/O, time comes in as `now_ms`.

JSON is the proto3 JSON of the response (google.protobuf.json_format) with
every non-optional field present, keys sorted: stable for scripts. One form
per field, whatever proto3 JSON would do: 64-bit integers are JSON numbers
(proto3 JSON makes them strings), and etcd lease ids are 16-digit hex
strings, as tables show them. An optional reading that is absent (a GPU
without a power sensor) stays absent, and shows as "-" in tables: it means
"not available", not zero.

Tables fit a width: each renderer takes `width` (the terminal's; None for
`-o wide`, every column) and drops its less important columns until the
table fits. Id columns (worker, node, lease, GPU uuid) are never cut: they
keep their full width, as `drain WORKER` needs the whole id.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from tandem.v1 import admin_pb2, common_pb2, registry_pb2

DASH = "-"

_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})
# 64-bit fields shown as hex ids rather than numbers.
HEX_ID_FIELDS = frozenset({"lease_id"})


def lease_hex(lease_id: int) -> str:
    """An etcd lease id as etcdctl prints it: 16 hex digits."""
    return f"{lease_id & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def to_dict(message: Message) -> dict[str, Any]:
    """The message as JSON data: proto3 JSON with plain fields present, 64-bit numbers as numbers, hex lease ids."""
    data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return _normalize(data, message.DESCRIPTOR)


def to_json(data: Message | dict[str, Any]) -> str:
    return json.dumps(to_dict(data) if isinstance(data, Message) else data, sort_keys=True, indent=2)


def _normalize(data: dict[str, Any], descriptor: Any) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.json_name not in data:
            continue
        value = data[field.json_name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            data[field.json_name] = {k: _value(v, value_field) for k, v in value.items()}
        elif field.is_repeated:
            data[field.json_name] = [_value(v, field) for v in value]
        else:
            data[field.json_name] = _value(value, field)
    return data


def _value(value: Any, field: Any) -> Any:
    if field.message_type is not None:
        return _normalize(value, field.message_type) if isinstance(value, dict) else value
    if field.type in _INT64_TYPES:
        number = int(value)
        return lease_hex(number) if field.name in HEX_ID_FIELDS else number
    return value


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


@dataclass(frozen=True)
class Col:
    """A table column. `drop`: 0 is always shown; at narrow widths the highest numbers go first.
    `ident`: an id a person copies into another command, never cut (it keeps its full width)."""

    header: str
    drop: int = 0
    ident: bool = False
    right: bool = False


def _cell_width(cell: str) -> int:
    return max((len(line) for line in cell.split("\n")), default=0)


def table_width(widths: Sequence[int]) -> int:
    """Width of a SIMPLE_HEAD table without padded edges: a space at each edge, 3 between columns. Pure."""
    return sum(widths) + 2 + 3 * max(0, len(widths) - 1)


def fit(columns: Sequence[Col], rows: Sequence[Sequence[str]], width: int | None) -> Table:
    """A table of `rows` that fits `width`: droppable columns leave, highest `drop` first, until the
    rest fits (None: every column). Id columns keep their longest value's width."""
    natural = [max([len(col.header), *(_cell_width(row[i]) for row in rows)]) for i, col in enumerate(columns)]
    shown = list(range(len(columns)))
    if width is not None:
        for index in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop):
            if table_width([natural[i] for i in shown]) <= width:
                break
            shown.remove(index)
    table = _table()
    for i in shown:
        col = columns[i]
        if col.ident:
            table.add_column(col.header, width=natural[i], no_wrap=True, overflow="fold")
        else:
            # What does not fit wraps onto more lines; nothing is cut to "…".
            table.add_column(col.header, justify="right" if col.right else "left", overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
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


NODE_COLUMNS = (Col("NODE", ident=True), Col("HOST", 4), Col("GPUS", 3), Col("HEALTH"), Col("SIMULATED", 5),
                Col("CORDONED", 1), Col("DRIVER", 8), Col("LABELS", 6), Col("UPDATED", 7))


def nodes(response: admin_pb2.ListNodesResponse, now_ms: int, width: int | None = None) -> RenderableType:
    rows = []
    for status in response.nodes:
        record = status.record
        cordon = _with_reason("yes", status.cordon.reason) if status.cordoned else "no"
        labels = ",".join(f"{k}={v}" for k, v in sorted(record.labels.items())) or DASH
        driver = record.driver_version or (record.inventory_note and "(no driver)") or DASH
        rows.append([record.node, record.host or DASH, gpu_mix(record.gpus), _node_health(record.gpus),
                     "yes" if record.simulated else "no", cordon, driver, labels,
                     age(record.updated_at_unix_ms, now_ms)])
    table = fit(NODE_COLUMNS, rows, width)
    notes = [f"{s.record.node}: {s.record.inventory_note}" for s in response.nodes if s.record.inventory_note]
    return Group(table, Text("\n".join(notes))) if notes else _or_none(table, "nodes registered")


GPU_COLUMNS = (Col("NODE", ident=True), Col("IDX"), Col("MODEL", 3), Col("UUID", 4, ident=True),
               Col("MEM GiB", 6), Col("UTIL%", 7), Col("TEMP", 8), Col("POWER W", 9), Col("HEALTH"),
               Col("WORKER", ident=True), Col("ROLE", 5))


def gpus(response: admin_pb2.ListGpusResponse, width: int | None = None) -> RenderableType:
    rows = []
    for status in response.gpus:
        gpu = status.gpu
        model = gpu.catalog_id or gpu.name or DASH
        if status.simulated:
            model += " (sim)"
        memory = f"{gib(gpu.memory_used_bytes)}/{gib(gpu.memory_total_bytes)}" if gpu.memory_total_bytes else DASH
        rows.append([status.node, str(gpu.index), model, gpu.uuid or DASH, memory, _opt(gpu, "utilization_percent"),
                     _opt(gpu, "temperature_c", "{}C"), _opt(gpu, "power_w", "{:.0f}"),
                     _with_reason(health_name(gpu.health), gpu.health_reason), status.worker_id or DASH,
                     role_name(status.role) if status.worker_id else DASH])
    return _or_none(fit(GPU_COLUMNS, rows, width), "GPUs registered")


WORKER_COLUMNS = (Col("WORKER", ident=True), Col("ROLE", 1), Col("MODEL", 3), Col("NODE", 4), Col("GPUS", 6),
                  Col("ENGINE", 9), Col("STATE"), Col("HEALTH", 5), Col("ROUTABLE", 2), Col("ENDPOINT", 7),
                  Col("AGE", 8))


def workers(response: admin_pb2.ListWorkersResponse, now_ms: int, width: int | None = None) -> RenderableType:
    rows = []
    for status in response.workers:
        record = status.record
        gpus_text = f"{record.gpu_count}x {record.gpu_type}" if record.gpu_count else (record.gpu_type or DASH)
        if record.simulated:
            gpus_text += " (sim)"
        state = state_name(record.state)
        if record.state == registry_pb2.WORKER_STATE_SWITCHING:
            state += f" (to {role_name(record.role)})"
        elif status.HasField("role_intent") and status.role_intent.role != record.role:
            state += f" ({role_name(status.role_intent.role)} requested)"
        if status.HasField("drain") and record.state != registry_pb2.WORKER_STATE_DRAINING:
            state += " (drain requested)"
        health = (_with_reason(serving_name(status.health.status), status.health.reason)
                  if status.HasField("health") else "not probed")
        routable = "yes" if status.routable else ("no (node cordoned)" if status.node_cordoned else "no")
        rows.append([record.worker_id, role_name(record.role), record.model or DASH, record.node or DASH, gpus_text,
                     record.engine or DASH, state, health, routable, record.endpoint or DASH,
                     age(record.started_at_unix_ms, now_ms)])
    return _or_none(fit(WORKER_COLUMNS, rows, width), "workers registered")


LEASE_COLUMNS = (Col("LEASE", ident=True), Col("HOLDER", ident=True), Col("TTL"), Col("KEYS"))  # keys wrap


def leases(response: admin_pb2.ListLeasesResponse, width: int | None = None) -> RenderableType:
    rows = []
    for lease in response.leases:
        remaining = "expired" if lease.remaining_ttl_s < 0 else f"{lease.remaining_ttl_s}s"
        rows.append([lease_hex(lease.lease_id), lease.holder or DASH, f"{remaining} of {lease.granted_ttl_s}s",
                     "\n".join(lease.keys) or DASH])
    return _or_none(fit(LEASE_COLUMNS, rows, width), "leases")


@dataclass(frozen=True)
class Served:
    """Workers registered for one model, by role."""

    model: str
    prefill: int = 0
    decode: int = 0
    unified: int = 0
    ready: int = 0

    @property
    def workers(self) -> int:
        return self.prefill + self.decode + self.unified

    def describe(self) -> str:
        roles = [f"{n} {role}" for role, n in (("prefill", self.prefill), ("decode", self.decode),
                                               ("unified", self.unified)) if n]
        return f"{' + '.join(roles)} ({self.ready} ready)"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "prefill": self.prefill, "decode": self.decode, "unified": self.unified,
                "ready": self.ready, "workers": self.workers}


def served_models(response: admin_pb2.ListWorkersResponse) -> list[Served]:
    """The models workers serve, from the registry, sorted by name. Pure."""
    counts: dict[str, Counter[str]] = {}
    for status in response.workers:
        record = status.record
        count = counts.setdefault(record.model or DASH, Counter())
        count[role_name(record.role)] += 1
        count["ready"] += record.state == registry_pb2.WORKER_STATE_READY
    return [Served(model, c["prefill"], c["decode"], c["unified"], c["ready"]) for model, c in sorted(counts.items())]


MODEL_COLUMNS = (Col("MODEL", ident=True), Col("SERVED BY"), Col("CHECKPOINT", 1), Col("TOKENIZER", 9),
                 Col("PREFILL", 4, right=True), Col("DECODE", 4, right=True), Col("TTFT ms", 5, right=True),
                 Col("ITL ms", 5, right=True), Col("MAX CONTEXT", 6, right=True), Col("MAX OUTPUT", 6, right=True))


def models(response: admin_pb2.ListModelSpecsResponse, served: Sequence[Served] | None = None,
           width: int | None = None) -> RenderableType:
    """Model specs and, given `served`, the models workers serve (with or without a spec).

    PREFILL and DECODE are the spec's desired workers; SERVED BY is what is registered.
    """
    by_model = {s.model: s for s in served or ()}
    specs = {spec.name: spec for spec in response.models}
    rows = []
    for name in sorted(specs.keys() | by_model.keys()):
        serving = by_model[name].describe() if name in by_model else "none"
        spec = specs.get(name)
        if spec is None:
            rows.append([name, serving, "(no spec)", DASH, DASH, DASH, DASH, DASH, DASH, DASH])
            continue
        rows.append([name, serving, spec.checkpoint or DASH, spec.tokenizer or "(checkpoint's)",
                     str(spec.desired_prefill_workers), str(spec.desired_decode_workers),
                     f"{spec.slo.ttft_ms:g}" if spec.slo.ttft_ms else DASH,
                     f"{spec.slo.inter_token_ms:g}" if spec.slo.inter_token_ms else DASH,
                     str(spec.max_context_tokens or DASH), str(spec.max_output_tokens or DASH)])
    columns = MODEL_COLUMNS if served is not None else tuple(c for c in MODEL_COLUMNS if c.header != "SERVED BY")
    if served is None:
        rows = [row[:1] + row[2:] for row in rows]
    return _or_none(fit(columns, rows, width), "model specs" if served is None else "model specs and no workers")


# -- mutation confirmations -------------------------------------------------------------------------

def drained(response: admin_pb2.DrainWorkerResponse) -> str:
    intent = response.intent
    return f"worker {intent.worker_id} is draining" + (f" (reason: {intent.reason})" if intent.reason else "")


def undrained(worker_id: str, response: admin_pb2.UndrainWorkerResponse) -> str:
    return (f"drain of worker {worker_id} withdrawn" if response.removed
            else f"worker {worker_id} had no drain request")


def role_set(response: admin_pb2.SetWorkerRoleResponse) -> str:
    intent = response.intent
    return (f"worker {intent.worker_id} switches to {role_name(intent.role)}"
            + (f" (reason: {intent.reason})" if intent.reason else ""))


def role_cleared(worker_id: str, response: admin_pb2.ClearWorkerRoleResponse) -> str:
    return (f"role request of worker {worker_id} withdrawn (it keeps its role)" if response.removed
            else f"worker {worker_id} had no role request")


def cordoned(response: admin_pb2.CordonNodeResponse) -> str:
    intent = response.intent
    return f"node {intent.node} cordoned" + (f" (reason: {intent.reason})" if intent.reason else "")


def uncordoned(node: str, response: admin_pb2.UncordonNodeResponse) -> str:
    return f"node {node} uncordoned" if response.removed else f"node {node} was not cordoned"
