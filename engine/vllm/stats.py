"""vLLM's scheduler statistics, kept for Tandem's load reports.

vLLM hands each engine step's SchedulerStats (KV cache usage, running and
waiting requests) to the stat loggers it was given; `StatsHolder.factory` is
one, and `snapshot()` returns the latest figures without blocking.

An engine with no request in flight reports nothing further after its last
step, so the last figures may still count a request aborted since; with
prefix caching off (as VllmEngine runs it) an idle engine holds no blocks,
which `snapshot(idle=True)` reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Snapshot:
    kv_usage: float = 0.0
    running: int = 0
    waiting: int = 0


class StatsHolder:
    """The latest SchedulerStats of one engine; written from vLLM's output handler, read by stats()."""

    def __init__(self) -> None:
        self._latest = Snapshot()

    def record(self, scheduler_stats: Any) -> None:
        if scheduler_stats is not None:
            self._latest = Snapshot(kv_usage=float(scheduler_stats.kv_cache_usage),
                                    running=int(scheduler_stats.num_running_reqs),
                                    waiting=int(scheduler_stats.num_waiting_reqs))

    def snapshot(self, *, idle: bool = False) -> Snapshot:
        return Snapshot() if idle else self._latest

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """A vLLM StatLoggerBase feeding this holder (the signature of vLLM's StatLoggerFactory)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        holder = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                holder.record(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Logger(vllm_config, engine_index)
