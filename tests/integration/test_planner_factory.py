"""A planner-driven role switch on a local factory (`tandemctl up --planner enact`), as an operator sees it.

Real processes end to end: the router measures the traffic and publishes
it, the control plane's leader plans from it and writes a role intent, the
worker switches live, and `tandemctl plan` and `tandemctl workers` show it.
The traffic turns prompt-heavy (long prompts, two-token answers) against a
tight TTFT target on a factory of one prefill and three decode workers: the
cost model says prefill is the bottleneck, so a decode worker must move.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from router_svc.client import AsyncTandemClient
from tests.integration.test_up import kill_leftovers, read_state, wait_until_up

pytestmark = pytest.mark.integration

MODEL = "llama-3-8b"
# Plan every second from the last ten seconds of traffic; no dwell, so the first plan may move a worker.
FAST_PLANNER = {"TANDEM_PLANNER_INTERVAL_S": "1", "TANDEM_PLANNER_MIN_DWELL_S": "0",
                "TANDEM_DEMAND_WINDOW_S": "10", "TANDEM_DEMAND_INTERVAL_S": "0.5"}


def tandemctl(state: dict[str, Any], *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "controlplane.cli", "--endpoint", state["admin"], *args, "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def prompt_heavy_traffic(router: str, stop: asyncio.Event, failures: list[str]) -> int:
    """Four callers sending 3000-token prompts for two tokens each until `stop`; returns requests served."""
    served = 0
    prompt = "x " * 1500

    async def caller(client: AsyncTandemClient) -> None:
        nonlocal served
        while not stop.is_set():
            try:
                await client.complete(prompt, model=MODEL, max_tokens=2)
                served += 1
            except Exception as exc:  # counted, and reported by the test
                failures.append(repr(exc))
    async with AsyncTandemClient([router], timeout=60) as client:
        await asyncio.gather(*(caller(client) for _ in range(4)))
    return served


def test_planner_moves_a_decode_worker_to_prefill_when_prompts_get_long(tmp_path: Path) -> None:
    state_dir = tmp_path / "factory"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "up", "--engine", "sim", "--prefill", "1", "--decode", "3",
         "--planner", "enact", "--state-dir", str(state_dir), "--lease-ttl", "2", "--no-metrics",
         "--router-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--http-listen", ""],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **FAST_PLANNER})
    try:
        state = wait_until_up(up, state_dir, tmp_path / "up.log")
        tandemctl(state, "models", "put", MODEL, "--checkpoint", MODEL, "--ttft-ms", "150", "--itl-ms", "50")
        before = {w["record"]["workerId"]: w["record"] for w in tandemctl(state, "workers")["workers"]}
        assert sorted(r["role"] for r in before.values()) == ["ROLE_DECODE"] * 3 + ["ROLE_PREFILL"]

        failures: list[str] = []

        async def drive() -> tuple[dict[str, Any], dict[str, Any]]:
            stop = asyncio.Event()
            traffic = asyncio.create_task(prompt_heavy_traffic(state["router"], stop, failures))
            try:
                give_up = time.monotonic() + 120
                while True:
                    assert time.monotonic() < give_up, "no planner-driven switch within 120 s"
                    assert not traffic.done(), traffic
                    workers = await asyncio.to_thread(tandemctl, state, "workers")
                    # Read after the workers: a plan read first may predate the one that moved a worker.
                    plan = (await asyncio.to_thread(tandemctl, state, "plan"))["plans"]
                    moved = [w for w in workers["workers"] if before[w["record"]["workerId"]]["role"] == "ROLE_DECODE"
                             and w["record"]["role"] == "ROLE_PREFILL" and w["record"]["state"] == "WORKER_STATE_READY"]
                    if plan and moved:
                        return plan[0], moved[0]
                    await asyncio.sleep(0.5)
            finally:
                stop.set()
                served = await traffic
                assert served > 0
        plan, moved = asyncio.run(drive())
        assert not failures, failures[:5]
        worker_id = moved["record"]["workerId"]
        # The same process, not a restart: same pid, same start time, the role since later.
        assert moved["record"]["startedAtUnixMs"] == before[worker_id]["startedAtUnixMs"]
        assert int(moved["record"]["roleSinceUnixMs"]) > int(before[worker_id]["startedAtUnixMs"])
        assert state["pids"][worker_id] == read_state(state_dir)["pids"][worker_id]
        assert plan["model"] == MODEL and plan["mode"] == "enact" and plan["demand"]["arrivalRateRps"] > 0
        shown = subprocess.run([sys.executable, "-m", "controlplane.cli", "--endpoint", state["admin"], "plan"],
                               capture_output=True, text=True, timeout=60)
        assert f"model {MODEL}" in shown.stdout and "goodput" in shown.stdout, shown.stdout
    finally:
        kill_leftovers(up, state_dir)
        log.close()
