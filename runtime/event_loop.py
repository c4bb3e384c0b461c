"""Which asyncio event loop a service runs on: `--event-loop auto|asyncio|uvloop`.

uvloop (libuv) runs the same asyncio programs with less CPU per event than
asyncio's own loop: fewer Python frames per callback, socket writes and
timers in C. For a router or a worker, whose CPU per request is mostly
event-loop work around gRPC and HTTP messages, that is the cheapest speed
there is (figures in docs/BENCHMARKS.md). `auto` takes it when it can be
imported and falls back to asyncio's loop otherwise (a platform without a
uvloop wheel); `asyncio` forces the standard loop, to rule the loop out
when debugging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("auto", "asyncio", "uvloop")
DEFAULT_EVENT_LOOP = "auto"

T = TypeVar("T")


def loop_runner(event_loop: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """`asyncio.run`, or `uvloop.run` for "uvloop", and for "auto" when uvloop can be imported.

    Raises ValueError (a settings error: services exit 2 with it) for a name
    not in EVENT_LOOPS, and when "uvloop" is asked for but cannot be imported.
    """
    if event_loop not in EVENT_LOOPS:
        raise ValueError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, got {event_loop!r}")
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if event_loop == "uvloop":
                raise ValueError(f"--event-loop uvloop: uvloop cannot be imported ({exc}); install it or use "
                                 f"--event-loop auto") from None
        else:
            return uvloop.run
    return asyncio.run


def running_loop_name() -> str:
    """"uvloop" or "asyncio": the loop the caller runs on (for logs and the ready line)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


__all__ = ["DEFAULT_EVENT_LOOP", "EVENT_LOOPS", "loop_runner", "running_loop_name"]
