"""cancel_and_wait: the tasks' cancellation is swallowed, the caller's is not."""

from __future__ import annotations

import asyncio

import pytest

from runtime.tasks import cancel_and_wait


async def test_cancels_and_waits_for_every_task_and_tolerates_none_and_finished_ones() -> None:
    stopped: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(name)

    a, b = asyncio.create_task(worker("a")), asyncio.create_task(worker("b"))
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await asyncio.sleep(0)
    await cancel_and_wait(a, None, b, done)
    assert sorted(stopped) == ["a", "b"] and a.cancelled() and b.cancelled()
    await cancel_and_wait(a, b)  # twice: nothing left to do


async def test_the_callers_own_cancellation_propagates() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():  # ignores its first cancellation to keep the caller waiting
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    await task


async def test_a_task_that_had_failed_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("watch loop died")

    task = asyncio.create_task(broken(), name="watcher")
    await asyncio.sleep(0)
    await cancel_and_wait(task)  # cleanup goes on
    assert "background task watcher had failed: watch loop died" in caplog.text
