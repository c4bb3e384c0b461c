"""Ends a vLLM engine-core process when the Tandem worker that started it dies.

vLLM runs its engine core (and, under it, model workers) in child processes.
A worker that exits normally shuts them down (VllmEngine.close); one that is
SIGKILLed cannot, and the orphans would keep their memory and CPU. The KV
connector (engine.vllm.connector), which vLLM constructs inside those
processes, calls `watch_parent()`: a daemon thread notices when the process
is re-parented (its parent is gone), removes the worker's KV file directory,
asks the process to stop with SIGTERM (vLLM's handler shuts its own workers
down) and exits it for good after a grace.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

log = logging.getLogger(__name__)

POLL_S = 0.5
GRACE_S = 5.0
_started = False
_lock = threading.Lock()


def watch_parent(orphaned_dir: str = "") -> None:
    """Starts the watcher once per process; returns at once.

    `orphaned_dir` (the KV file directory the dead worker can no longer remove) is deleted first.
    """
    global _started
    with _lock:
        if _started:
            return
        _started = True
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent, orphaned_dir), name="tandem-parent-watch", daemon=True).start()


def _watch(parent: int, orphaned_dir: str) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    log.warning("parent process %d is gone: stopping this vLLM process (%d)", parent, os.getpid())
    if orphaned_dir:
        shutil.rmtree(orphaned_dir, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
