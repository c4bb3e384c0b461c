"""Stopping background tasks."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def cancel_and_wait(*tasks: asyncio.Task[object] | None) -> None:
    """Cancels each task and waits until every one has finished. Safe on finished tasks and None.

    For close() paths: it never raises what the tasks raised. Their own
    CancelledError is expected; a task that had already died of another
    error is logged (with its traceback) and otherwise ignored, so the rest of
    the cleanup still runs. A cancellation of the caller while it waits
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
            log.warning("background task %s had failed: %s", task.get_name(), error, exc_info=error)
