"""GPU health rules, declared inventories, NVML reading and the agent's write rule, with plain values.

NVML itself cannot run here (no NVIDIA driver); the reader is driven by
`FakeNvml`, a stand-in for the pynvml module that keeps pynvml's constants
and error type, so the field guarding is exercised as on a real part.
"""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from controlplane.agent import AgentSettings, parse_labels, publish_reason, resolve
from controlplane.gpu_health import EccTrend, HealthSignals, XidSighting, classify_health, describe_xid
from controlplane.inventory import NvmlReader, read_inventory
from controlplane.simulated_gpus import SimulatedGpusError, parse_declaration, simulated_gpus
from runtime.catalog import default_catalog
from runtime.config import ConfigError
from tandem.v1 import registry_pb2

OK, DEGRADED, FAILED = registry_pb2.GPU_HEALTH_OK, registry_pb2.GPU_HEALTH_DEGRADED, registry_pb2.GPU_HEALTH_FAILED


# -- health rules -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("signals", "health", "reason"), [
    (HealthSignals(), OK, ""),
    (HealthSignals(ecc_uncorrected=0, ecc_corrected_recent=0), OK, ""),
    (HealthSignals(xids=(XidSighting(79, 5.0),)), FAILED, "XID 79: GPU has fallen off the bus"),
    (HealthSignals(xids=(XidSighting(48, 86400.0),)), FAILED, "XID 48: double-bit ECC error"),
    (HealthSignals(ecc_uncorrected=2), FAILED, "2 uncorrected ECC error(s) since the driver loaded"),
    (HealthSignals(gpu_lost=True), FAILED, "NVML reports the GPU is lost"),
    (HealthSignals(row_remap_failed=True), FAILED, "row remapping failed: the GPU needs service"),
    (HealthSignals(row_remap_pending=True), DEGRADED, "row remapping pending: reset the GPU to apply it"),
    (HealthSignals(retired_pages_pending=True), DEGRADED, "page retirement pending: reset the GPU to apply it"),
    (HealthSignals(ecc_corrected_recent=3), DEGRADED, "3 corrected ECC error(s) in the last 10 min"),
    (HealthSignals(xids=(XidSighting(92, 30.0),)), DEGRADED, "XID 92: high single-bit ECC error rate"),
    # A degrading XID ages out; an application fault (13, 31, 43) is not held against the GPU.
    (HealthSignals(xids=(XidSighting(92, 3600.0),)), OK, ""),
    (HealthSignals(xids=(XidSighting(13, 1.0), XidSighting(31, 1.0), XidSighting(43, 1.0))), OK, ""),
    (HealthSignals(nvml_errors=("temperature: Unknown Error",)), DEGRADED, "NVML errors: temperature: Unknown Error"),
])
def test_classify_health(signals: HealthSignals, health: int, reason: str) -> None:
    assert classify_health(signals) == (health, reason)


def test_failed_outranks_degraded_and_lists_every_failure_newest_xid_first() -> None:
    health, reason = classify_health(HealthSignals(
        ecc_uncorrected=1, ecc_corrected_recent=5, row_remap_pending=True,
        xids=(XidSighting(94, 60.0), XidSighting(13, 30.0), XidSighting(79, 1.0)),
    ))
    assert health == FAILED
    assert reason == ("XID 79: GPU has fallen off the bus; XID 94: contained ECC error (reset the GPU); "
                      "1 uncorrected ECC error(s) since the driver loaded")


def test_every_xid_has_a_description() -> None:
    assert describe_xid(63).startswith("ECC page retirement or row remapping")
    assert "XID catalog" in describe_xid(12345)


def test_ecc_trend_counts_only_new_errors_within_the_window() -> None:
    trend = EccTrend(window_s=600)
    assert trend.observe(0, 40) == 0  # errors from before the agent started are not "rising"
    assert trend.observe(10, 40) == 0
    assert trend.observe(20, 43) == 3
    assert trend.observe(300, 44) == 4
    assert trend.observe(615, 44) == 4  # the rise at t=20 is still within (15, 615]
    assert trend.observe(621, 44) == 1  # and now it has left the window
    assert trend.observe(1000, 44) == 0
    assert trend.observe(1010, 2) == 0  # counter reset (driver reloaded): start over
    assert trend.observe(1020, 5) == 3


# -- declared inventories ---------------------------------------------------------------------------

def test_simulated_gpus_look_like_nvml_and_are_numbered_across_types() -> None:
    gpus = simulated_gpus("gpu-7", "H100-SXM:4,a100-80gb:2")
    catalog = default_catalog()
    assert [g.index for g in gpus] == list(range(6))
    assert [g.uuid for g in gpus] == [f"SIM-gpu-7-{i}" for i in range(6)]
    assert [g.catalog_id for g in gpus] == ["H100-SXM"] * 4 + ["A100-80GB"] * 2
    assert gpus[0].name == catalog.get("H100-SXM").nvml_names[0]
    assert catalog.match(gpus[5].name) == catalog.get("A100-80GB")
    assert gpus[0].memory_total_bytes == catalog.get("H100-SXM").memory_bytes
    assert all(g.health == OK for g in gpus)
    assert not gpus[0].HasField("power_w") and not gpus[0].HasField("temperature_c")


@pytest.mark.parametrize(("text", "message"), [
    ("H100:4", "unknown GPU type 'H100'; known: H100-SXM, "),
    ("H100-SXM:0", "count for H100-SXM must be 1..64, got '0'"),
    ("H100-SXM:65", "count for H100-SXM must be 1..64, got '65'"),
    ("H100-SXM:four", "count for H100-SXM must be 1..64, got 'four'"),
    ("H100-SXM", "expected TYPE:COUNT (for example H100-SXM:4), got 'H100-SXM'"),
    ("H100-SXM:1,H100-SXM:2", "H100-SXM is listed twice"),
    (" , ", "no GPUs declared"),
])
def test_bad_declarations_name_the_flag_and_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(SimulatedGpusError, match=r"^--simulate-gpus: ") as caught:
        parse_declaration(text)
    assert message in str(caught.value)


# -- NVML reading -----------------------------------------------------------------------------------

def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


class FakeNvml:
    """The pynvml calls NvmlReader makes, over a list of device dicts; a missing key raises NOT_SUPPORTED."""

    def __init__(self, devices: list[dict[str, Any]], init_error: int | None = None) -> None:
        for name in dir(pynvml):
            if name.startswith(("NVML_", "nvmlEventType")) or name == "NVMLError":
                setattr(self, name, getattr(pynvml, name))
        self.devices = devices
        self.init_error = init_error
        self.events: list[tuple[int, int]] = []  # (device index, xid) waiting in the event set
        self.registered: set[int] = set()

    def _get(self, handle: int, key: str) -> Any:
        value = self.devices[handle].get(key)
        if value is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if isinstance(value, pynvml.NVMLError):
            raise value
        return value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise _err(self.init_error)

    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: return "570.86.15"
    def nvmlSystemGetCudaDriverVersion(self) -> int: return 12080
    def nvmlEventSetCreate(self) -> str: return "event-set"
    def nvmlEventSetFree(self, events: str) -> None: ...
    def nvmlDeviceGetCount(self) -> int: return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.devices[index].get("lost"):
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str: return str(self._get(h, "uuid"))
    def nvmlDeviceGetName(self, h: int) -> str: return str(self._get(h, "name"))
    def nvmlDeviceGetPciInfo(self, h: int) -> Any: return SimpleNamespace(busId=b"00000000:1B:00.0")
    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any: return self._get(h, "memory")
    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any: return self._get(h, "util")
    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int: return int(self._get(h, "temp"))
    def nvmlDeviceGetPowerUsage(self, h: int) -> int: return int(self._get(h, "power_mw"))
    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int: return int(self._get(h, "limit_mw"))

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        return int(self._get(h, "ecc")[kind])

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int: return int(self._get(h, "retired_pending"))
    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]: return self._get(h, "remap")
    def nvmlDeviceGetSupportedEventTypes(self, h: int) -> int: return pynvml.nvmlEventTypeXidCriticalError

    def nvmlDeviceRegisterEvents(self, h: int, types: int, events: str) -> None:
        self.registered.add(h)

    def nvmlEventSetWait(self, events: str, timeout_ms: int) -> Any:
        assert timeout_ms == 0, "the reader must never block on the event set"
        if not self.events:
            raise _err(pynvml.NVML_ERROR_TIMEOUT)
        index, code = self.events.pop(0)
        return SimpleNamespace(device=index, eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=code)


def h100(**overrides: Any) -> dict[str, Any]:
    device = {
        "uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3",
        "memory": SimpleNamespace(total=85_520_809_984, used=1_048_576),
        "util": SimpleNamespace(gpu=37, memory=12), "temp": 41, "power_mw": 123_456, "limit_mw": 700_000,
        "ecc": (0, 0), "remap": (0, 0, 0, 0),
    }
    device.update(overrides)
    return device


def test_a_fully_supported_gpu_is_read_and_matched_to_the_catalog() -> None:
    nvml = FakeNvml([h100()])
    inventory = NvmlReader(nvml).read()
    assert (inventory.driver_version, inventory.cuda_version, inventory.note) == ("570.86.15", "12.8", "")
    (gpu,) = inventory.gpus
    assert (gpu.uuid, gpu.catalog_id, gpu.pci_bus_id) == ("GPU-aaaa", "H100-SXM", "00000000:1B:00.0")
    assert (gpu.memory_total_bytes, gpu.memory_used_bytes) == (85_520_809_984, 1_048_576)
    assert (gpu.utilization_percent, gpu.memory_utilization_percent, gpu.temperature_c) == (37, 12, 41)
    assert gpu.power_w == pytest.approx(123.456) and gpu.power_limit_w == pytest.approx(700.0)
    assert (gpu.ecc_corrected_errors, gpu.ecc_uncorrected_errors) == (0, 0)
    assert gpu.HasField("ecc_uncorrected_errors")  # a real zero is a reading
    assert (gpu.health, gpu.health_reason) == (OK, "")
    assert nvml.registered == {0}


def test_readings_a_part_does_not_offer_stay_unset_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    # An L4-like part without ECC, power readings or remapping; an unknown model gets no catalog id.
    part = h100(uuid="GPU-bbbb", name="NVIDIA Mystery GPU", power_mw=None, limit_mw=None, ecc=None, remap=None)
    reader = NvmlReader(FakeNvml([part]))
    with caplog.at_level(logging.INFO, logger="controlplane.inventory"):
        gpu = reader.read().gpus[0]
        reader.read()
    for name in ("power_w", "power_limit_w", "ecc_corrected_errors", "ecc_uncorrected_errors"):
        assert not gpu.HasField(name), name
    assert gpu.HasField("temperature_c") and gpu.catalog_id == "" and gpu.health == OK
    notes = [r for r in caplog.records if "left unset" in r.getMessage()]
    assert len(notes) == 1
    assert notes[0].unavailable == "ecc, page retirement, power, power limit, row remapping"  # type: ignore[attr-defined]


def test_a_fatal_xid_fails_the_gpu_and_stays_in_recent_xids() -> None:
    nvml = FakeNvml([h100(), h100(uuid="GPU-cccc")])
    clock = [1000.0]
    reader = NvmlReader(nvml, clock=lambda: clock[0])
    assert all(g.health == OK for g in reader.read().gpus)
    nvml.events = [(1, 13), (1, 79)]
    second = reader.read().gpus
    assert second[0].health == OK
    assert (second[1].health, second[1].health_reason) == (FAILED, "XID 79: GPU has fallen off the bus")
    assert [(x.code, x.description) for x in second[1].recent_xids] == [
        (13, "graphics engine exception"), (79, "GPU has fallen off the bus")]
    # Application XIDs push old entries out of recent_xids, but a fatal XID holds the GPU FAILED.
    nvml.events = [(1, 13)] * 20
    clock[0] += 7200
    third = reader.read().gpus[1]
    assert len(third.recent_xids) == 8 and third.health == FAILED


def test_rising_corrected_ecc_and_uncorrected_ecc() -> None:
    nvml = FakeNvml([h100(ecc=(5, 0))])
    clock = [0.0]
    reader = NvmlReader(nvml, clock=lambda: clock[0])
    assert reader.read().gpus[0].health == OK  # old corrected errors are not a trend
    nvml.devices[0]["ecc"] = (9, 0)
    clock[0] = 30
    gpu = reader.read().gpus[0]
    assert (gpu.health, gpu.health_reason) == (DEGRADED, "4 corrected ECC error(s) in the last 10 min")
    nvml.devices[0]["ecc"] = (9, 1)
    assert reader.read().gpus[0].health == FAILED


def test_a_gpu_that_falls_off_keeps_its_identity_and_is_failed() -> None:
    nvml = FakeNvml([h100()])
    reader = NvmlReader(nvml)
    reader.read()
    nvml.devices[0]["lost"] = True
    gpu = reader.read().gpus[0]
    assert (gpu.uuid, gpu.catalog_id, gpu.health) == ("GPU-aaaa", "H100-SXM", FAILED)
    assert "GPU is lost" in gpu.health_reason


def test_unexpected_nvml_errors_degrade_the_gpu_and_name_the_field() -> None:
    gpu = NvmlReader(FakeNvml([h100(temp=_err(pynvml.NVML_ERROR_UNKNOWN))])).read().gpus[0]
    assert not gpu.HasField("temperature_c")
    assert gpu.health == DEGRADED and gpu.health_reason.startswith("NVML errors: temperature: ")


@pytest.mark.parametrize(("code", "note"), [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "No NVIDIA driver found"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "The NVIDIA driver is installed but not loaded"),
])
def test_without_a_driver_the_inventory_is_empty_with_one_note_logged_once(
        code: int, note: str, caplog: pytest.LogCaptureFixture) -> None:
    reader = NvmlReader(FakeNvml([], init_error=code))
    with caplog.at_level(logging.INFO, logger="controlplane.inventory"):
        first, second = reader.read(), reader.read()
    assert first == second and first.gpus == () and first.note.startswith(note)
    assert first.note.endswith("reporting no GPUs.")
    assert [r.getMessage() for r in caplog.records] == [first.note]


def test_the_real_nvml_reading_of_this_machine_is_consistent() -> None:
    """Through the real pynvml: GPUs with identities and no note, or none with a note saying why."""
    inventory = read_inventory()
    if inventory.gpus:
        assert inventory.note == "" and inventory.driver_version
        assert all(gpu.uuid.startswith(("GPU-", "MIG-")) and gpu.name for gpu in inventory.gpus)
    else:
        assert inventory.note.endswith("reporting no GPUs.")


# -- the agent's write rule and settings --------------------------------------------------------------

def node(*gpus: registry_pb2.GpuInfo, **fields: Any) -> registry_pb2.NodeRecord:
    return registry_pb2.NodeRecord(node="n1", gpus=list(gpus), **fields)


def test_publish_reason_writes_changes_at_once_and_readings_at_most_every_n_refreshes() -> None:
    base = registry_pb2.GpuInfo(index=0, uuid="GPU-1", utilization_percent=10, temperature_c=40)
    busy = registry_pb2.GpuInfo(index=0, uuid="GPU-1", utilization_percent=90, temperature_c=60)
    assert publish_reason(None, node(base), 1, 6) == "first"
    assert publish_reason(node(base), node(base, updated_at_unix_ms=5), 99, 6) == ""
    assert publish_reason(node(base), node(busy), 5, 6) == ""
    assert publish_reason(node(base), node(busy), 6, 6) == "readings"
    failed = registry_pb2.GpuInfo(index=0, uuid="GPU-1", utilization_percent=10, temperature_c=40,
                                  health=FAILED, health_reason="XID 79: GPU has fallen off the bus")
    assert publish_reason(node(base), node(failed), 1, 6) == "changed"
    assert publish_reason(node(base), node(), 1, 6) == "changed"
    assert publish_reason(node(base), node(base, inventory_note="x"), 1, 6) == "changed"
    assert publish_reason(node(base), node(base, labels={"rack": "r2"}), 1, 6) == "changed"


def test_labels_and_settings_are_checked_naming_the_flag() -> None:
    assert parse_labels("rack=r1, zone = a,,") == {"rack": "r1", "zone": "a"}
    with pytest.raises(ConfigError, match="--labels: expected key=value"):
        parse_labels("rack")
    with pytest.raises(ConfigError, match=re.escape("--refresh-interval must be 0.1..3600 seconds, got 0")):
        resolve(AgentSettings(node="n1", refresh_interval=0))
    with pytest.raises(ConfigError, match=re.escape("--node must be 1..128 characters")):
        resolve(AgentSettings(node="bad name"))
    with pytest.raises(ConfigError, match="--simulate-gpus: unknown GPU type 'X'"):
        resolve(AgentSettings(node="n1", simulate_gpus="X:1"))
    settings = resolve(AgentSettings(node="n1"))
    assert settings.host  # defaults to the hostname
