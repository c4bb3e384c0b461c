"""`tandemctl up` as a user runs it: starts, serves a generate request, stops on SIGINT leaving nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "up.json"
    return json.loads(path.read_text()) if path.exists() else {}


def wait_until_up(up: subprocess.Popen[bytes], state_dir: Path, log_path: Path, *, timeout: float = 180,
                  what: str = "tandemctl up") -> dict[str, Any]:
    """up.json once the factory says "up"; fails with the log if `up` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while read_state(state_dir).get("status") != "up":
        assert up.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.1)  # poll interval
    return read_state(state_dir)


def kill_leftovers(up: subprocess.Popen[bytes], state_dir: Path) -> None:
    """On a failure, still leave nothing behind: Ctrl-C first (it stops its children in order), then
    SIGKILL whatever up.json says is left (each child runs in its own session)."""
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
    for pid in read_state(state_dir).get("pids", {}).values():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_up_generate_and_ctrl_c(tmp_path: Path) -> None:
    state_dir = tmp_path / "factory"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "up", "--state-dir", str(state_dir), "--lease-ttl", "2",
         "--router-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        state = wait_until_up(up, state_dir, tmp_path / "up.log")
        names = {"etcd", "agent", "controlplane", "prefill-0", "decode-0", "router"}
        assert names <= set(state["pids"])
        # Metrics are on by default: every process serves /metrics on the port up.json lists.
        assert set(state["metrics"]) == names
        for name, address in state["metrics"].items():
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
                assert reply.status == 200, name
        assert state["metrics"]["router"] in (tmp_path / "up.log").read_text()
        generated = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "generate", "--router", state["router"],
             "What is the capital of France?", "--max-tokens", "32"], capture_output=True, text=True, timeout=60)
        assert generated.returncode == 0, generated.stderr
        # The default model is a real instruct model, asked through its chat template.
        assert "Paris" in generated.stdout, generated.stdout
        assert re.search(r"\[smollm2-135m: \d+ prompt \+ \d+ completion tokens", generated.stderr), generated.stderr
        status = subprocess.run([sys.executable, "-m", "controlplane.cli", "--endpoint", state["admin"], "workers",
                                 "-o", "json"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert {w["record"]["workerId"] for w in json.loads(status.stdout)["workers"]} == {"prefill-0", "decode-0"}
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, (tmp_path / "up.log").read_text()
        left = {name: pid for name, pid in state["pids"].items() if alive(pid)}
        assert not left, f"processes left running after Ctrl-C: {left}"
    finally:
        kill_leftovers(up, state_dir)
        log.close()


def test_ctrl_c_during_start_up_stops_what_started(tmp_path: Path) -> None:
    state_dir = tmp_path / "factory"
    log = open(tmp_path / "up.log", "wb")
    # The sim engine without --fleet: each worker gets a default simulated GPU.
    up = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "up", "--engine", "sim", "--prefill", "0", "--decode", "2",
         "--state-dir", str(state_dir), "--lease-ttl", "2", "--router-listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # Interrupt while the first worker starts: etcd, agent and control plane are running by then.
        while "decode-0" not in read_state(state_dir).get("pids", {}):
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "tandemctl up did not reach the workers"
            time.sleep(0.05)  # poll interval
        assert read_state(state_dir)["status"] == "starting"
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 130, (tmp_path / "up.log").read_text()
        state = read_state(state_dir)
        assert {"etcd", "agent", "controlplane", "decode-0"} <= set(state["pids"])
        assert "decode-1" not in state["pids"] and "router" not in state["pids"], "start-up went on after Ctrl-C"
        left = {name: pid for name, pid in state["pids"].items() if alive(pid)}
        assert not left, f"processes left running after Ctrl-C: {left}"
        output = (tmp_path / "up.log").read_text()
        assert "start-up interrupted" in output and output.index("stopping decode-0") < output.index("stopping agent")
    finally:
        kill_leftovers(up, state_dir)
        log.close()


def test_bad_options_fail_before_anything_starts(tmp_path: Path) -> None:
    state_dir = tmp_path / "factory"
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "up", "--engine", "tensorrt", "--admin-listen", "7070",
         "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--engine must be one of torch, sim, vllm" in result.stderr
    assert "--admin-listen expects host:port" in result.stderr
    assert not state_dir.exists(), "nothing may start (or be written) when an option is wrong"
