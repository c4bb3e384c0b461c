"""Shared helpers of the benchmarks in bench/: machine header, percentiles, CPU time, tables, a local factory.

Not a benchmark itself (running it does nothing). Every benchmark imports it
after putting the repository root and `protos/` on sys.path.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "protos"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# The repository root must be on sys.path first: tests/ is not part of the wheel.
from tests.support.testbed import Testbed  # noqa: E402

SIM_8B = ("--engine", "sim", "--model", "llama-3-8b", "--gpu-type", "H100-SXM")


def machine_lines(title: str) -> list[str]:
    """The header every benchmark prints first: what, when, on which machine."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    # Other work on the machine skews every timing here: say how busy it was at the start.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"# {title}",
        f"# {now}; {os.cpu_count()} CPUs ({model}); Python {platform.python_version()} on {platform.system()}; "
        f"load average {load} at start",
    ]


def print_header(title: str) -> None:
    print("\n".join(machine_lines(title)), flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * min(100.0, max(0.0, q)) / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width text table; floats are printed as given (format them first)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def wait_routable(endpoint: str, model: str, *, prefill: int = 1, decode: int = 1, timeout: float = 30.0) -> None:
    """Waits until the router at `endpoint` lists `model` with at least these routable workers."""
    import time

    import grpc

    from tandem.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(endpoint) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while True:
            models = {m.name: m for m in stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models}
            info = models.get(model)
            if info is not None and info.prefill_workers >= prefill and info.decode_workers >= decode:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router never saw {prefill}P+{decode}D for {model}: {models}")
            time.sleep(0.05)


def testbed(*, lease_ttl: int = 2, keep: bool = False) -> Testbed:
    """etcd and Tandem processes for a benchmark (quiet logs; the directory goes unless `keep`)."""
    return Testbed(lease_ttl=lease_ttl, keep=keep, shutdown_grace=5, extra_args=("--log-level", "warning"))


if __name__ == "__main__":
    pass
