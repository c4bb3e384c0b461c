"""A sim engine for tests: started, checked clean on exit, on real or virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from engine.base import EngineConfig
from engine.sim import SimEngine

SPEEDUP = 1000.0


class VirtualTime:
    """A clock that moves only when the engine sleeps; `gate` cleared holds every step."""

    def __init__(self) -> None:
        self.now = 0.0
        self.gate = asyncio.Event()
        self.gate.set()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await self.gate.wait()
        self.now += seconds
        await asyncio.sleep(0)


@asynccontextmanager
async def sim(vt: VirtualTime | None = None, **overrides: Any) -> AsyncIterator[SimEngine]:
    """A started engine; on exit, checks that no request or KV block was left behind."""
    values: dict[str, Any] = {"model": "llama-3-8b", "gpu_type": "H100-SXM", "speedup": SPEEDUP}
    values.update(overrides)
    config = EngineConfig(**values)
    engine = SimEngine(config, clock=vt.clock, sleep=vt.sleep) if vt else SimEngine(config)
    await engine.start()
    try:
        yield engine
        stats = engine.stats()
        assert (stats.active_requests, stats.active_sequences, stats.kv_blocks_used) == (0, 0, 0)
    finally:
        await engine.close()
