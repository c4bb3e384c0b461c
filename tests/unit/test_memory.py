"""HeapTrimmer: gives memory back once after a burst of removals, not during it, not for a few."""

from __future__ import annotations

import asyncio

from runtime.memory import HeapTrimmer, release_freed_memory


def test_a_burst_of_removals_trims_once_after_it_ends() -> None:
    async def scenario() -> list[int]:
        calls: list[int] = []
        trimmer = HeapTrimmer(threshold=100, quiet_s=0.05, release=lambda: calls.append(1))
        for _ in range(10):
            trimmer.removed(30)  # 300 in all, past the threshold three times: still one pending trim
        assert calls == []  # not while the burst goes on
        await asyncio.sleep(0.2)  # timers fire in order: the trim's (0.05 s) before this one
        trimmer.removed(10)  # a few more after it: under the threshold again
        await asyncio.sleep(0.2)
        trimmer.close()
        return calls

    assert asyncio.run(scenario()) == [1]


def test_a_few_removals_never_trim() -> None:
    async def scenario() -> int:
        trimmer = HeapTrimmer(threshold=100, quiet_s=0.01, release=lambda: None)
        trimmer.removed(99)
        await asyncio.sleep(0.05)
        return trimmer.trims

    assert asyncio.run(scenario()) == 0


def test_closing_cancels_a_pending_trim() -> None:
    async def scenario() -> int:
        trimmer = HeapTrimmer(threshold=1, quiet_s=0.02, release=lambda: None)
        trimmer.removed(5)
        trimmer.close()
        await asyncio.sleep(0.05)
        return trimmer.trims

    assert asyncio.run(scenario()) == 0


def test_releasing_memory_is_safe_to_call_any_time() -> None:
    garbage = [[i] * 100 for i in range(10_000)]
    del garbage
    release_freed_memory()
    release_freed_memory()
