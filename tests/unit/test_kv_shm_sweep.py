"""The shm KV transport's clean-up: segments of producers that died are removed, live ones' never."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.kv.shm_transport import PREFIX, sweep_orphans


def test_segments_of_dead_producers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f"{PREFIX}{dead_pid}-00aa"
    mine = tmp_path / f"{PREFIX}{os.getpid()}-00bb"
    parent = tmp_path / f"{PREFIX}{os.getppid()}-00cc"  # a running process that is not this one
    legacy = tmp_path / f"{PREFIX}0123456789abcdef"  # an older name without a pid: not judged
    stranger = tmp_path / "someone-else-segment"
    for path in (orphan, mine, parent, legacy, stranger):
        path.write_bytes(b"kv")
    assert sweep_orphans(str(tmp_path)) == 1
    assert not orphan.exists()
    assert mine.exists() and parent.exists() and legacy.exists() and stranger.exists()


def test_a_missing_directory_sweeps_nothing(tmp_path: Path) -> None:
    assert sweep_orphans(str(tmp_path / "absent")) == 0
