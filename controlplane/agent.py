"""tandem-agent: writes this node's GPU inventory and GPU health into the registry.

    python -m controlplane.agent --etcd 127.0.0.1:2379 [--node NAME] [--simulate-gpus H100-SXM:4]

One process per GPU node. It serves nothing: it reads the GPUs (NVML, or a
declared `--simulate-gpus` inventory) every `--refresh-interval` seconds and
keeps `/tandem/v1/nodes/{node}` current under its own lease, so a stopped
agent's node disappears at once and a killed one's within the lease TTL.

Write rule (etcd write load stays low): the record is written at start, then
only when something meaningful changes (GPUs appear or vanish, health or its
reason, ECC counts, XID events, the inventory note, labels, versions), and
for slowly moving readings (utilisation, memory used, temperature, power) at
most once every `--readings-every` refreshes (default 6: once a minute at
the default 10 s refresh). Prometheus gauges (`--metrics-listen`) follow
every refresh.

Readiness: the ready file is written once the first NodeRecord is in etcd,
or, when etcd does not answer, after the first inventory with
`"registered": false` (the record is written as soon as etcd answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane.inventory import Inventory, NvmlReader, summarize
from controlplane.simulated_gpus import SimulatedGpusError, simulated_gpus
from registry.etcd_client import EtcdClient
from registry.keys import check_name
from registry.session import LeaseSession
from registry.settings import CommonSettings
from registry.store import Registry
from runtime import __version__
from runtime.config import ConfigError, load_config
from runtime.event_loop import loop_runner
from runtime.logs import configure_logging
from runtime.metrics import MetricsEndpoint
from runtime.peers import default_node_name
from runtime.server import announce_ready, install_stop_signals
from runtime.setting import check_ranges, setting
from tandem.v1 import registry_pb2

log = logging.getLogger("controlplane.agent")

PROG = "tandem-agent"


@dataclass
class AgentSettings(CommonSettings):
    node: str = setting("", "node name in the registry (default: this host's name)")
    host: str = setting("", "address other hosts use to reach this node (default: hostname)")
    labels: str = setting("", "node labels, k=v[,k=v...]")
    simulate_gpus: str = setting(
        "", "declare GPUs instead of reading NVML, TYPE:COUNT[,...] with catalog ids (H100-SXM:4,A100-80GB:4)")
    refresh_interval: float = setting(10.0, "time between inventory readings", min=0.1, max=3600, unit="seconds")
    readings_every: int = setting(
        6, "write changed utilisation/memory/temperature/power at most every N refreshes", min=1, max=10_000)


def parse_labels(text: str) -> dict[str, str]:
    """{"rack": "r1", ...} from "rack=r1,zone=a"; ConfigError naming --labels otherwise."""
    labels: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--labels: expected key=value[,key=value...], got {item!r}")
        labels[key.strip()] = value.strip()
    return labels


def resolve(settings: AgentSettings) -> AgentSettings:
    """Settings with defaults filled in (node, host) and every value checked; ConfigError naming the flag."""
    node = settings.node or default_node_name()
    try:
        check_name(node, "--node")
    except ValueError as exc:
        raise ConfigError(f"{exc} (pass --node when the hostname is not a valid node name)") from None
    check_ranges(settings)  # what load_config checked, for settings built in code
    parse_labels(settings.labels)
    if settings.simulate_gpus:
        try:
            simulated_gpus(node, settings.simulate_gpus)
        except SimulatedGpusError as exc:
            raise ConfigError(str(exc)) from None
    return dataclasses.replace(settings, node=node, host=settings.host or socket.gethostname())


# -- the write rule (pure) --------------------------------------------------------------------------

_READINGS = ("utilization_percent", "memory_utilization_percent", "temperature_c", "power_w", "memory_used_bytes")


def _without_readings(record: registry_pb2.NodeRecord) -> registry_pb2.NodeRecord:
    stripped = registry_pb2.NodeRecord()
    stripped.CopyFrom(record)
    stripped.updated_at_unix_ms = 0
    for gpu in stripped.gpus:
        for name in _READINGS:
            gpu.ClearField(name)  # type: ignore[arg-type]
    return stripped


def publish_reason(last: registry_pb2.NodeRecord | None, current: registry_pb2.NodeRecord,
                   refreshes_since_write: int, readings_every: int) -> str:
    """Why `current` should be written now ("first", "changed", "readings"), or "" to skip. Pure."""
    if last is None:
        return "first"
    if _without_readings(last) != _without_readings(current):
        return "changed"
    if refreshes_since_write >= readings_every:
        previous = registry_pb2.NodeRecord(gpus=last.gpus)
        now = registry_pb2.NodeRecord(gpus=current.gpus)
        if previous != now:
            return "readings"
    return ""


def build_record(settings: AgentSettings, inventory: Inventory, *, simulated: bool, started_ms: int,
                 now_ms: int) -> registry_pb2.NodeRecord:
    return registry_pb2.NodeRecord(
        node=settings.node, host=settings.host, labels=parse_labels(settings.labels), gpus=list(inventory.gpus),
        simulated=simulated, driver_version=inventory.driver_version, cuda_version=inventory.cuda_version,
        agent_version=__version__, started_at_unix_ms=started_ms, updated_at_unix_ms=now_ms,
        inventory_note=inventory.note,
    )


# -- metrics ------------------------------------------------------------------------------------------

# (series suffix, help, GpuInfo field, scale); optional fields without a reading get no series.
# NVML's percentages are exported as Prometheus ratios (0..1).
_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("utilization_ratio", "GPU busy time over NVML's last sample period, 0..1", "utilization_percent", 0.01),
    ("memory_utilization_ratio", "GPU memory controller busy time, 0..1", "memory_utilization_percent", 0.01),
    ("memory_used_bytes", "GPU memory in use, bytes", "memory_used_bytes", 1.0),
    ("memory_total_bytes", "GPU memory, bytes", "memory_total_bytes", 1.0),
    ("temperature_celsius", "GPU core temperature", "temperature_c", 1.0),
    ("power_watts", "GPU power draw", "power_w", 1.0),
    ("power_limit_watts", "GPU enforced power limit", "power_limit_w", 1.0),
    ("ecc_corrected_errors", "corrected ECC errors since the driver loaded", "ecc_corrected_errors", 1.0),
    ("ecc_uncorrected_errors", "uncorrected ECC errors since the driver loaded", "ecc_uncorrected_errors", 1.0),
    ("health", "GPU health: 1 ok, 2 degraded, 3 failed", "health", 1.0),
)


def _reading(gpu: registry_pb2.GpuInfo, name: str) -> float | None:
    optional = gpu.DESCRIPTOR.fields_by_name[name].has_presence
    return float(getattr(gpu, name)) if not optional or gpu.HasField(name) else None  # type: ignore[arg-type]


class GpuCollector(Collector):
    """tandem_gpu_* gauges from the latest reading; a reading NVML does not offer has no series."""

    def __init__(self) -> None:
        self.record: registry_pb2.NodeRecord | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        record = self.record
        if record is None:
            return
        labels = ["node", "gpu", "uuid", "catalog_id"]
        for suffix, doc, name, scale in _GAUGES:
            family = GaugeMetricFamily(f"tandem_gpu_{suffix}", doc, labels=labels)
            for gpu in record.gpus:
                value = _reading(gpu, name)
                if value is not None:
                    family.add_metric([record.node, str(gpu.index), gpu.uuid, gpu.catalog_id], value * scale)
            yield family
        count = GaugeMetricFamily("tandem_agent_gpus", "GPUs this agent reports", labels=["node", "simulated"])
        count.add_metric([record.node, str(record.simulated).lower()], len(record.gpus))
        yield count


REGISTRY_WRITES = Counter("tandem_agent_registry_writes", "NodeRecord writes to etcd, by reason", ["reason"])


# -- the agent ----------------------------------------------------------------------------------------

class InventorySource(Protocol):
    def read(self) -> Inventory: ...

    def close(self) -> None: ...


class DeclaredSource:
    """A fixed, declared inventory (--simulate-gpus)."""

    def __init__(self, node: str, declaration: str) -> None:
        self.inventory = Inventory(gpus=tuple(simulated_gpus(node, declaration)))

    def read(self) -> Inventory:
        return self.inventory

    def close(self) -> None:
        pass


class NodeAgent:
    """Refresh loop: read the inventory, write the NodeRecord when the write rule says so. Run once."""

    def __init__(self, settings: AgentSettings, source: InventorySource, registry: Registry, session: LeaseSession,
                 collector: GpuCollector | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.source = source
        self.registry = registry
        self.session = session
        self.collector = collector
        self.clock = clock
        self.simulated = isinstance(source, DeclaredSource)
        self.started_ms = int(clock() * 1000)
        self.last_written: registry_pb2.NodeRecord | None = None
        self.refreshes_since_write = 0

    async def refresh(self) -> tuple[registry_pb2.NodeRecord, bool | None]:
        """Reads once; returns the record and whether it was written (None: not due, False: deferred)."""
        inventory = await asyncio.to_thread(self.source.read) if not self.simulated else self.source.read()
        record = build_record(self.settings, inventory, simulated=self.simulated, started_ms=self.started_ms,
                              now_ms=int(self.clock() * 1000))
        if self.collector is not None:
            self.collector.record = record
        self.refreshes_since_write += 1
        reason = publish_reason(self.last_written, record, self.refreshes_since_write, self.settings.readings_every)
        log.debug("inventory read", extra={"gpus": len(record.gpus), "write": reason or "not due"})
        if not reason:
            return record, None
        if reason == "changed" and self.last_written is not None:
            log.info("node inventory changed", extra={"gpus": summarize(record.gpus), **_health_counts(record)})
        # A deferred write is held by the session and flushed when etcd answers: count it as published.
        written = await self.registry.register_node(self.session, record)
        REGISTRY_WRITES.labels(reason).inc()
        self.last_written, self.refreshes_since_write = record, 0
        return record, written

    async def run(self, stop: asyncio.Event, on_first: Callable[[registry_pb2.NodeRecord, bool], None]) -> None:
        """Refreshes until `stop` is set. Calls `on_first(record, registered)` once, after the first write."""
        first = True
        while not stop.is_set():
            try:
                record, written = await self.refresh()
            except Exception:
                log.exception("inventory refresh failed; retrying at the next interval")
            else:
                if first:
                    first = False
                    if not written:
                        # Give the session a moment to get its lease; the write is flushed then.
                        written = await self.session.wait_alive(max(2.0, 2 * self.settings.etcd_timeout))
                    on_first(record, bool(written))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.refresh_interval):
                    await stop.wait()


def _health_counts(record: registry_pb2.NodeRecord) -> dict[str, int]:
    counts = {"degraded": 0, "failed": 0}
    for gpu in record.gpus:
        if gpu.health == registry_pb2.GPU_HEALTH_DEGRADED:
            counts["degraded"] += 1
        elif gpu.health == registry_pb2.GPU_HEALTH_FAILED:
            counts["failed"] += 1
    return counts


async def run_agent(settings: AgentSettings) -> None:
    """The process: one lease session, the refresh loop, clean shutdown on SIGTERM/SIGINT (lease revoked)."""
    source: InventorySource = (DeclaredSource(settings.node, settings.simulate_gpus) if settings.simulate_gpus
                               else NvmlReader())
    client = await EtcdClient(settings.etcd_settings()).connect()
    session = LeaseSession(client, ttl=settings.lease_ttl, name=f"agent {settings.node}")
    collector = GpuCollector() if settings.metrics_listen else None
    metrics: MetricsEndpoint | None = None
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        if collector is not None:
            REGISTRY.register(collector)
            metrics = MetricsEndpoint(settings.metrics_listen)
        session.start()
        agent = NodeAgent(settings, source, Registry(client, settings.keys()), session, collector)

        def on_first(record: registry_pb2.NodeRecord, registered: bool) -> None:
            extra = {"node": settings.node, "gpus": summarize(record.gpus), "simulated": record.simulated,
                     "registered": registered}
            if registered:
                log.info("node registered", extra=extra)
            else:
                log.warning(f"etcd at {client.settings.describe()} is not answering; node registration is pending "
                            "and happens as soon as it answers", extra=extra)
            info: dict[str, object] = {"node": settings.node, "gpus": len(record.gpus),
                                       "simulated": record.simulated, "registered": registered, "pid": os.getpid()}
            if metrics is not None:
                info["metrics_endpoint"] = f"{metrics.host}:{metrics.port}"
                info["metrics_port"] = metrics.port
            announce_ready(settings.ready_file, **info)

        await agent.run(stop, on_first)
    finally:
        await session.close()
        await client.close()
        source.close()
        if metrics is not None:
            metrics.close()
        if collector is not None:
            REGISTRY.unregister(collector)
        log.info("agent stopped", extra={"node": settings.node})


def main(argv: Sequence[str] | None = None) -> None:
    """Console script `tandem-agent`. Exit status 2 for bad settings, with one line naming the setting."""
    try:
        settings = resolve(load_config(AgentSettings, argv, prog=PROG, section="agent",
                                       description="Tandem node agent: GPU inventory and health into the registry"))
        settings.etcd_settings()
        run = loop_runner(settings.event_loop)
    except (ConfigError, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(PROG, settings.log_level, settings.log_format)
    run(run_agent(settings))


if __name__ == "__main__":
    main()
