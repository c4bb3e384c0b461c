"""`tandemctl up` as a user runs it: starts, serves a generate request, stops on SIGINT leaving nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_generate_and_ctrl_c(tmp_path: Path) -> None:
    state_dir = tmp_path / "factory"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "up", "--state-dir", str(state_dir), "--lease-ttl", "2",
         "--router-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        state_file = state_dir / "up.json"
        deadline = time.monotonic() + 180
        while not state_file.exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "tandemctl up did not come up"
            time.sleep(0.1)  # poll interval
        state = json.loads(state_file.read_text())
        assert {"etcd", "agent", "controlplane", "prefill-0", "decode-0", "router"} <= set(state["pids"])
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
        # On a failure above, still leave nothing behind: Ctrl-C first (it stops its children in
        # order), then SIGKILL whatever up.json says is left (each child runs in its own session).
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        if (state_dir / "up.json").exists():
            for pid in json.loads((state_dir / "up.json").read_text())["pids"].values():
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        log.close()
