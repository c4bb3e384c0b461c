"""Waiting for a condition in a test: poll with a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """`check()`'s first truthy value; fails the test naming `what` once `timeout` seconds pass without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)  # poll interval
