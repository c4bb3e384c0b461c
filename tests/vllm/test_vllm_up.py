"""`tandemctl up --engine vllm`: a local factory on vLLM workers (tiny-vllm on CPU) answers `tandemctl generate`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_up import alive, kill_leftovers, wait_until_up
from tests.vllm.test_vllm_failover import descendants, survivors

pytestmark = pytest.mark.integration


def test_up_on_vllm_serves_generate_and_stops_clean(tmp_path: Path) -> None:
    state_dir = tmp_path / "factory"
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "up", "--engine", "vllm", "--state-dir", str(state_dir),
         "--lease-ttl", "5", "--router-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--http-listen", ""],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        state = wait_until_up(up, state_dir, tmp_path / "up.log", timeout=300, what="tandemctl up --engine vllm")
        assert state["model"] == "tiny-vllm"
        engines = {pid for name in ("prefill-0", "decode-0") for pid in descendants(state["pids"][name])}
        assert engines, "the workers run no vLLM engine processes"
        for prompt in ("Hello there", "Grüße aus Köln, 你好世界 " * 30):  # a chat turn; a raw prompt > 256 tokens
            generated = subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "generate", "--router", state["router"], "--raw",
                 prompt, "--max-tokens", "12"], capture_output=True, text=True, timeout=120)
            assert generated.returncode == 0, generated.stderr
            assert re.search(r"\[tiny-vllm: \d+ prompt \+ 12 completion tokens", generated.stderr), generated.stderr
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0, (tmp_path / "up.log").read_text()
        left = {name: pid for name, pid in state["pids"].items() if alive(pid)}
        assert not left, f"processes left running after Ctrl-C: {left}"
        assert not survivors(engines), "vLLM engine processes outlived their workers"
    finally:
        kill_leftovers(up, state_dir)
        log.close()
