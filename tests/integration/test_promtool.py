"""Every process's /metrics passes Prometheus's own linter, `promtool check metrics`.

promtool comes from Debian's `prometheus` package (.ci/run installs it). On a
developer machine without it the test skips and says so; in CI (CI=true) a
missing promtool fails the test, since a skip would count as a pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest

from controlplane.etcd_server import EtcdServer
from tests.support.metrics_fleet import get, send_traffic, start_metrics_fleet

pytestmark = pytest.mark.integration


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = ("promtool not installed: this test runs in CI (.ci/run installs Debian's prometheus package) "
                  "and wherever promtool is on PATH (apt-get install prometheus)")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}: CI must run the linter, not skip it")
        pytest.skip(reason)
    return path


async def test_every_process_passes_promtool(etcd: EtcdServer, processes) -> None:  # type: ignore[no-untyped-def]
    promtool = _promtool()
    ports, router = start_metrics_fleet(etcd, processes)
    # After traffic, so every labelled series has samples to lint.
    await send_traffic(router.endpoint)
    problems = {}
    for name, port in ports.items():
        status, text = get(port, "/metrics")
        assert status == 200 and "tandem_" in text, (name, status)
        done = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"], input=text,
                                       capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            problems[name] = (done.stdout + done.stderr).strip()
    assert not problems, "promtool check metrics:\n" + "\n".join(f"{k}: {v}" for k, v in problems.items())
