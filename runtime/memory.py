"""Giving memory back to the operating system after a process's working set shrank.

CPython frees objects into its own allocators and glibc's heap; after a
spike (a registry flood of 10,000 worker records, then their deletion)
most of those pages stay mapped to the process, and RSS stays at the
spike's high-water mark although nothing holds them. `HeapTrimmer` waits
until a burst of removals is over, then runs a full garbage collection and
glibc's `malloc_trim(0)`, which returns the heap's free pages. Elsewhere
(musl, macOS) only the collection runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_freed_memory() -> None:
    """Collects garbage, then returns the C heap's free pages to the OS where glibc allows it."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


class HeapTrimmer:
    """Calls release_freed_memory once `threshold` items were removed and `quiet_s` passed without more.

    `removed(n)` is cheap (a counter and at most one timer): call it for
    every removal. Runs on the caller's event loop; `close()` cancels a
    pending trim.
    """

    def __init__(self, *, threshold: int = 1000, quiet_s: float = 2.0,
                 release: Callable[[], None] = release_freed_memory) -> None:
        self.threshold = threshold
        self.quiet_s = quiet_s
        self.trims = 0
        self._release = release
        self._removed = 0
        self._timer: asyncio.TimerHandle | None = None

    def removed(self, count: int = 1) -> None:
        self._removed += count
        if self._removed < self.threshold:
            return
        # Wait for the burst to end: a trim in the middle of a mass deletion frees little and costs a pass.
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.quiet_s, self._trim)

    def _trim(self) -> None:
        self._timer = None
        removed, self._removed = self._removed, 0
        self._release()
        self.trims += 1
        log.info("returned freed memory to the OS", extra={"removed": removed})

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["HeapTrimmer", "release_freed_memory"]
