"""Stopping background tasks."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancels each task and waits until every one has finished. Safe on finished tasks and None.

    The tasks' own CancelledError is swallowed, so cleanup code can go on
    after it; a task that had failed with another error re-raises it here
    (after all have finished). A cancellation of the caller while it waits
    propagates at once; `await task` would instead hand it to the task and
    could lose it.
    """
    pending = [task for task in tasks if task is not None]
    if not pending:
        return
    for task in pending:
        task.cancel()
    await asyncio.wait(pending)
    for task in pending:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
