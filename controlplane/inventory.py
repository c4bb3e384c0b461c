"""A node's GPUs as NVML reports them.

`NvmlReader` reads every GPU through nvidia-ml-py (`pynvml`) into
`tandem.v1.GpuInfo`, matches its name to the GPU catalog, polls XID events
without blocking, and judges health with controlplane.gpu_health. A reading
NVML does not offer on a part leaves the optional proto field unset ("not
available", never a 0 pretending to be a reading) and is named once in the
log; without an NVIDIA driver the inventory is empty and carries a
one-sentence note, logged once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from controlplane.gpu_health import (
    FAILED,
    FATAL_XIDS,
    RECENT_WINDOW_S,
    EccTrend,
    HealthSignals,
    XidSighting,
    classify_health,
    describe_xid,
)
from runtime.catalog import GpuCatalog, default_catalog
from tandem.v1 import registry_pb2

log = logging.getLogger(__name__)

# -- NVML reading ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inventory:
    """One reading of a node's GPUs. `note` says why there are none, when NVML could not be used."""

    gpus: tuple[registry_pb2.GpuInfo, ...] = ()
    driver_version: str = ""
    cuda_version: str = ""
    note: str = ""


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Probe:
    """Calls NVML for one GPU, sorting failures into unsupported, lost and unexpected."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.unsupported = {nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND,
                            nvml.NVML_ERROR_NO_PERMISSION}
        self.unavailable: list[str] = []
        self.errors: list[str] = []
        self.lost = False

    def __call__(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self.nvml.NVMLError as exc:
            if exc.value in self.unsupported:
                self.unavailable.append(label)
            elif exc.value == self.nvml.NVML_ERROR_GPU_IS_LOST:
                self.lost = True
            else:
                self.errors.append(f"{label}: {exc}")
            return None


class _GpuState:
    """What the reader remembers about one GPU between refreshes."""

    def __init__(self, window_s: float, keep: int) -> None:
        self.ecc = EccTrend(window_s)
        self.xids: deque[registry_pb2.XidEvent] = deque(maxlen=keep)
        self.fatal: list[registry_pb2.XidEvent] = []  # first sighting of each fatal code, kept
        self.last: registry_pb2.GpuInfo | None = None
        self.unavailable_logged = False


class NvmlReader:
    """Reads this node's GPUs through NVML.

    `read()` may be called from any one thread at a time (the agent runs it
    in a worker thread: NVML calls block); it never raises for NVML trouble.
    Without a driver it retries NVML on each call, so a driver loaded after
    the agent started is picked up. `close()` is safe to call twice.
    """

    def __init__(self, nvml: Any = None, catalog: GpuCatalog | None = None,
                 clock: Callable[[], float] = time.time, recent_window_s: float = RECENT_WINDOW_S,
                 xids_kept: int = 8) -> None:
        if nvml is None:
            import pynvml  # the nvidia-ml-py package

            nvml = pynvml
        self.nvml = nvml
        self.catalog = catalog or default_catalog()
        self.clock = clock
        self.recent_window_s = recent_window_s
        self.xids_kept = xids_kept
        self._started = False
        self._note_logged = ""
        self._driver = ""
        self._cuda = ""
        self._events: Any = None
        self._registered: set[str] = set()
        self._gpus: dict[str, _GpuState] = {}

    def read(self) -> Inventory:
        note = self._start()
        if note:
            return Inventory(note=note)
        try:
            count = int(self.nvml.nvmlDeviceGetCount())
        except self.nvml.NVMLError as exc:
            self._stop()
            return Inventory(note=self._log_note(f"NVML could not list the GPUs ({exc}); reporting no GPUs."))
        self._note_logged = ""
        self._drain_xids()
        gpus = tuple(self._read_gpu(index) for index in range(count))
        return Inventory(gpus=gpus, driver_version=self._driver, cuda_version=self._cuda)

    def close(self) -> None:
        self._stop()

    # -- lifecycle ----------------------------------------------------------------------------------

    def _start(self) -> str:
        """Starts NVML if needed: "" once it is up, otherwise the note saying why (logged once per note)."""
        if self._started:
            return ""
        nvml = self.nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            if exc.value == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                note = "No NVIDIA driver found (libnvidia-ml.so.1 is not installed); reporting no GPUs."
            elif exc.value == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
                note = "The NVIDIA driver is installed but not loaded (NVML: Driver Not Loaded); reporting no GPUs."
            else:
                note = f"NVML could not start ({exc}); reporting no GPUs."
            return self._log_note(note)
        self._started = True
        probe = _Probe(nvml)
        self._driver = _text(probe("driver version", nvml.nvmlSystemGetDriverVersion) or "")
        cuda = probe("cuda version", nvml.nvmlSystemGetCudaDriverVersion)
        self._cuda = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) and cuda > 0 else ""
        self._events = probe("xid events", nvml.nvmlEventSetCreate)
        self._registered.clear()
        log.info("NVML started", extra={"driver": self._driver, "cuda": self._cuda})
        return ""

    def _stop(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            if self._events is not None:
                self.nvml.nvmlEventSetFree(self._events)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as exc:
            log.debug("NVML shutdown failed", extra={"error": str(exc)})
        self._events = None

    def _log_note(self, note: str) -> str:
        if note != self._note_logged:
            log.warning(note)
            self._note_logged = note
        return note

    # -- XID events ---------------------------------------------------------------------------------

    def _register_xids(self, uuid: str, handle: Any, probe: _Probe) -> None:
        if self._events is None or uuid in self._registered:
            return
        self._registered.add(uuid)
        xid = self.nvml.nvmlEventTypeXidCriticalError
        supported = probe("xid events", self.nvml.nvmlDeviceGetSupportedEventTypes, handle)
        if supported is not None and supported & xid:
            probe("xid events", self.nvml.nvmlDeviceRegisterEvents, handle, xid, self._events)
        elif supported is not None:
            probe.unavailable.append("xid events")

    def _drain_xids(self, limit: int = 64) -> None:
        """Takes the XID events waiting in the event set, without blocking (timeout 0), at most `limit`."""
        nvml = self.nvml
        if self._events is None:
            return
        for _ in range(limit):
            try:
                data = nvml.nvmlEventSetWait(self._events, 0)
            except nvml.NVMLError as exc:
                if exc.value != nvml.NVML_ERROR_TIMEOUT:
                    log.warning("reading XID events failed", extra={"error": str(exc)})
                return
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(data.device))
            except nvml.NVMLError:
                continue
            code = int(data.eventData)
            event = registry_pb2.XidEvent(code=code, at_unix_ms=int(self.clock() * 1000),
                                          description=describe_xid(code))
            state = self._state(uuid)
            state.xids.append(event)
            if code in FATAL_XIDS and all(seen.code != code for seen in state.fatal):
                state.fatal.append(event)
            log.warning("GPU XID event", extra={"uuid": uuid, "xid": code, "description": event.description})

    # -- one GPU ------------------------------------------------------------------------------------

    def _state(self, uuid: str) -> _GpuState:
        if uuid not in self._gpus:
            self._gpus[uuid] = _GpuState(self.recent_window_s, self.xids_kept)
        return self._gpus[uuid]

    def _last_at(self, index: int) -> registry_pb2.GpuInfo | None:
        for state in self._gpus.values():
            if state.last is not None and state.last.index == index:
                return state.last
        return None

    def _read_gpu(self, index: int) -> registry_pb2.GpuInfo:
        nvml = self.nvml
        probe = _Probe(nvml)
        handle = probe("handle", nvml.nvmlDeviceGetHandleByIndex, index)
        uuid = _text(probe("uuid", nvml.nvmlDeviceGetUUID, handle) or "") if handle is not None else ""
        if not uuid:
            # A GPU that stopped answering keeps the identity it had, so its claims stay attributable.
            gpu = registry_pb2.GpuInfo()
            last = self._last_at(index)
            if last is not None:
                gpu.CopyFrom(last)
            gpu.index = index
            gpu.health = FAILED
            gpu.health_reason = "NVML cannot read the GPU: " + (
                "; ".join(probe.errors) or ("GPU is lost" if probe.lost else "no uuid"))
            return gpu
        state = self._state(uuid)
        gpu = registry_pb2.GpuInfo(index=index, uuid=uuid)
        gpu.name = _text(probe("name", nvml.nvmlDeviceGetName, handle) or "")
        model = self.catalog.match(gpu.name) if gpu.name else None
        gpu.catalog_id = model.catalog_id if model else ""
        pci = probe("pci bus id", nvml.nvmlDeviceGetPciInfo, handle)
        gpu.pci_bus_id = _text(pci.busId) if pci is not None else ""
        memory = probe("memory", nvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            gpu.memory_total_bytes, gpu.memory_used_bytes = int(memory.total), int(memory.used)
        rates = probe("utilisation", nvml.nvmlDeviceGetUtilizationRates, handle)
        if rates is not None:
            gpu.utilization_percent, gpu.memory_utilization_percent = int(rates.gpu), int(rates.memory)
        temperature = probe("temperature", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        if temperature is None and "temperature" in probe.unavailable and hasattr(nvml, "nvmlDeviceGetTemperatureV"):
            # Drivers after CUDA 13 drop the old call for the versioned one.
            probe.unavailable.remove("temperature")
            temperature = probe("temperature", nvml.nvmlDeviceGetTemperatureV, handle, nvml.NVML_TEMPERATURE_GPU)
        if temperature is not None:
            gpu.temperature_c = int(temperature)
        power = probe("power", nvml.nvmlDeviceGetPowerUsage, handle)
        if power is not None:
            gpu.power_w = power / 1000.0  # NVML reports milliwatts
        limit = probe("power limit", nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        if limit is not None:
            gpu.power_limit_w = limit / 1000.0
        # Volatile counters: since the driver loaded, so a reset GPU starts clean.
        corrected = probe("ecc", nvml.nvmlDeviceGetTotalEccErrors, handle,
                          nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC)
        uncorrected = probe("ecc", nvml.nvmlDeviceGetTotalEccErrors, handle,
                            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
        if corrected is not None:
            gpu.ecc_corrected_errors = int(corrected)
        if uncorrected is not None:
            gpu.ecc_uncorrected_errors = int(uncorrected)
        # Page retirement is pre-Ampere, row remapping Ampere and later: most parts offer one of the two.
        retired_pending = probe("page retirement", nvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
        remap = probe("row remapping", nvml.nvmlDeviceGetRemappedRows, handle)
        self._register_xids(uuid, handle, probe)

        now = self.clock()
        gpu.recent_xids.extend(state.xids)
        sightings = {(e.code, e.at_unix_ms): e for e in (*state.fatal, *state.xids)}
        signals = HealthSignals(
            ecc_uncorrected=gpu.ecc_uncorrected_errors if gpu.HasField("ecc_uncorrected_errors") else None,
            ecc_corrected_recent=state.ecc.observe(now, int(corrected)) if corrected is not None else 0,
            retired_pages_pending=bool(retired_pending),
            row_remap_pending=bool(remap and remap[2]),
            row_remap_failed=bool(remap and remap[3]),
            xids=tuple(XidSighting(e.code, now - e.at_unix_ms / 1000)
                       for e in sorted(sightings.values(), key=lambda e: e.at_unix_ms)),
            gpu_lost=probe.lost,
            nvml_errors=tuple(probe.errors),
        )
        gpu.health, gpu.health_reason = classify_health(signals, self.recent_window_s)
        if not state.unavailable_logged:
            state.unavailable_logged = True
            unavailable = set(probe.unavailable)
            if not {"page retirement", "row remapping"} <= unavailable:
                unavailable -= {"page retirement", "row remapping"}  # a part offers one of the two
            if unavailable:
                log.info("GPU readings NVML does not offer on this part are left unset",
                         extra={"gpu": index, "uuid": uuid, "gpu_name": gpu.name,
                                "unavailable": ", ".join(sorted(unavailable))})
        state.last = gpu
        return gpu


def read_inventory(nvml: Any = None, catalog: GpuCatalog | None = None) -> Inventory:
    """One reading with a fresh reader (no XID history); for tools. The agent keeps one NvmlReader."""
    reader = NvmlReader(nvml, catalog)
    try:
        return reader.read()
    finally:
        reader.close()


def summarize(gpus: Sequence[registry_pb2.GpuInfo]) -> str:
    """GPU mix for a log line, like "4x H100-SXM, 2x L4"; NVML names stand in for unmatched models."""
    counts: dict[str, int] = {}
    for gpu in gpus:
        label = gpu.catalog_id or gpu.name or "unknown"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n}x {label}" for label, n in counts.items()) or "no GPUs"
