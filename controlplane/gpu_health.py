"""GPU health rules: NVML readings and XID events in, (GpuHealth, reason) out.

Pure: no I/O, no NVML; time comes in as arguments. controlplane.inventory
gathers the signals; docs/agent.md shows the table to operators:

    FAILED    NVML says the GPU is lost; a fatal XID since the agent started
              (48, 62, 63, 64, 74, 79, 94, 95, 119, 120, 140); a failed row
              remapping; uncorrected ECC errors since the driver loaded
    DEGRADED  row remapping or page retirement pending (needs a GPU reset);
              corrected ECC errors counted within the last 10 minutes; XID 92
              (high single-bit error rate) within that window; an NVML error
              reading a field that the part otherwise supports
    OK        none of the above
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from tandem.v1 import registry_pb2

OK, DEGRADED, FAILED = registry_pb2.GPU_HEALTH_OK, registry_pb2.GPU_HEALTH_DEGRADED, registry_pb2.GPU_HEALTH_FAILED

# XIDs after which the GPU must not take work until it is reset (NVIDIA's XID catalog: "reset GPU"
# or "reboot" as the recovery action). They keep the GPU FAILED until the agent restarts, which an
# operator does after resetting the GPU or rebooting the node.
FATAL_XIDS: Mapping[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded (reset the GPU to apply it)",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    94: "contained ECC error (reset the GPU)",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}
# XIDs that mean "usable, but watch it" while they are recent.
DEGRADING_XIDS: Mapping[int, str] = {
    92: "high single-bit ECC error rate",
}
# XIDs usually caused by an application, not the GPU: recorded, not held against the GPU.
OTHER_XIDS: Mapping[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    32: "invalid or corrupted push buffer stream",
    43: "GPU stopped processing",
    45: "preemptive cleanup after a previous error",
    61: "internal micro-controller warning",
    68: "video decoder exception",
    69: "graphics engine class error",
    109: "context switch timeout",
}
RECENT_WINDOW_S = 600.0


def describe_xid(code: int) -> str:
    """A short description of an XID code ("GPU has fallen off the bus"); generic for unknown codes."""
    for table in (FATAL_XIDS, DEGRADING_XIDS, OTHER_XIDS):
        if code in table:
            return table[code]
    return "driver-reported error (see NVIDIA's XID catalog)"


@dataclass(frozen=True)
class XidSighting:
    code: int
    age_s: float


@dataclass(frozen=True)
class HealthSignals:
    """What the health rules look at; None means the part does not report that signal."""

    ecc_uncorrected: int | None = None
    # Corrected ECC errors counted within the recent window (EccTrend.observe).
    ecc_corrected_recent: int = 0
    retired_pages_pending: bool = False
    row_remap_pending: bool = False
    row_remap_failed: bool = False
    # XIDs seen since the agent started (fatal ones are kept however old), newest last.
    xids: tuple[XidSighting, ...] = ()
    gpu_lost: bool = False
    # Unexpected NVML errors this refresh, for a person ("temperature: Unknown Error").
    nvml_errors: tuple[str, ...] = ()


def classify_health(signals: HealthSignals,
                    recent_window_s: float = RECENT_WINDOW_S) -> tuple[registry_pb2.GpuHealth.ValueType, str]:
    """(health, reason) for one GPU. Pure. Every reason of the worst level is listed, worst-first."""
    failed: list[str] = []
    degraded: list[str] = []
    if signals.gpu_lost:
        failed.append("NVML reports the GPU is lost")
    for sighting in reversed(signals.xids):
        reason = f"XID {sighting.code}: {describe_xid(sighting.code)}"
        if sighting.code in FATAL_XIDS and reason not in failed:
            failed.append(reason)
        elif sighting.code in DEGRADING_XIDS and sighting.age_s <= recent_window_s and reason not in degraded:
            degraded.append(reason)
    if signals.row_remap_failed:
        failed.append("row remapping failed: the GPU needs service")
    if signals.ecc_uncorrected:
        failed.append(f"{signals.ecc_uncorrected} uncorrected ECC error(s) since the driver loaded")
    if signals.row_remap_pending:
        degraded.append("row remapping pending: reset the GPU to apply it")
    if signals.retired_pages_pending:
        degraded.append("page retirement pending: reset the GPU to apply it")
    if signals.ecc_corrected_recent > 0:
        minutes = round(recent_window_s / 60)
        degraded.append(f"{signals.ecc_corrected_recent} corrected ECC error(s) in the last {minutes} min")
    if signals.nvml_errors:
        degraded.append("NVML errors: " + "; ".join(signals.nvml_errors))
    if failed:
        return FAILED, "; ".join(failed)
    if degraded:
        return DEGRADED, "; ".join(degraded)
    return OK, ""


class EccTrend:
    """Corrected-ECC errors added within a sliding window, from a GPU's volatile counter.

    One per GPU; not thread-safe. Counts present when observation starts do
    not count as new (they may be years old); a counter that goes down (driver
    reloaded) starts the history over.
    """

    def __init__(self, window_s: float = RECENT_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()  # (time, count), only when the count changed

    def observe(self, now: float, count: int) -> int:
        """Errors added in (now - window, now]."""
        if self._samples and count < self._samples[-1][1]:
            self._samples.clear()
        if not self._samples or count != self._samples[-1][1]:
            self._samples.append((now, count))
        horizon = now - self.window_s
        # Keep the newest sample at or before the horizon: it is the count at the window's start.
        while len(self._samples) > 1 and self._samples[1][0] <= horizon:
            self._samples.popleft()
        return count - self._samples[0][1]
