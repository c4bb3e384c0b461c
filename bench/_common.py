"""Shared helpers of the benchmarks in bench/: machine header, percentiles, CPU time, tables, a local factory.

Not a benchmark itself (running it does nothing). Every benchmark imports it
after putting the repository root and `protos/` on sys.path.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "protos"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

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


class LocalFactory:
    """etcd and Tandem service processes on loopback, each stopped by PID in `close()` (safe twice).

    Workers and routers run as real processes exactly as tests/integration
    start them: `--listen 127.0.0.1:0`, a ready file, health SERVING.
    """

    def __init__(self, root: Path | None = None, *, lease_ttl: int = 2, keep: bool = False) -> None:
        from controlplane.etcd_server import EtcdServer

        # A directory made here is removed by close() unless `keep` (logs, profiles to read after).
        self._remove = root is None and not keep
        self.root = Path(root or tempfile.mkdtemp(prefix="tandem-bench-"))
        self.lease_ttl = lease_ttl
        self.etcd = EtcdServer(data_dir=self.root / "etcd").start()
        self.children: dict[str, object] = {}

    def start(self, name: str, module: str, *args: str, wait: bool = True, python: Sequence[str] = ()):
        """Starts `python -m module` with the common flags; waits until it serves unless `wait` is False.

        `python` replaces the interpreter prefix (e.g. to run it under cProfile).
        """
        from controlplane.supervisor import ManagedProcess

        argv = [*(python or [sys.executable, "-m", module]), "--etcd", self.etcd.endpoint, "--listen",
                "127.0.0.1:0", "--lease-ttl", str(self.lease_ttl), "--shutdown-grace", "5",
                "--log-level", "warning", *args]
        if module != "router_svc":
            argv += ["--worker-id", name, "--node", f"node-{name}"]
        child = ManagedProcess(name, argv, log_dir=self.root / "logs").start()
        self.children[name] = child
        if wait:
            child.wait_ready(120)
        return child

    def close(self) -> None:
        for child in self.children.values():
            child.stop()  # type: ignore[attr-defined]
        self.etcd.close()
        if self._remove and not self.leftovers():
            shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """Names of children still running (should be empty after close())."""
        return [name for name, child in self.children.items() if child.alive()]  # type: ignore[attr-defined]

    def __enter__(self) -> LocalFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    pass
