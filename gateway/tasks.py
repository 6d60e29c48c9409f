"""Stopping a background task for good.

`task.cancel()` asks once, and code below the task can absorb the request: a loop cancelled while a Redis call
was in flight was seen later still running (its task "cancelling", waiting on its next sleep), the cancellation
turned somewhere below it into an error the store answers from its local view. A shutdown awaiting such a loop
waits forever: a test replica's lifespan stuck on its state-sync loop, its audit and spend never drained. `stop`
asks again until the task ends, and gives up after a bound rather than hang the shutdown.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["stop"]

log = logging.getLogger(__name__)

_ASK_EVERY_S = 0.05


async def stop(task: asyncio.Task | None, *, within_s: float = 5.0) -> bool:
    """Cancel `task` until it ends, for at most `within_s`; True once it has ended (its exception, if any, is
    retrieved and logged, never raised)."""
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within_s
    while not task.done():
        left = give_up - loop.time()
        if left <= 0:
            log.warning("background task %s did not stop within %.1f s; left behind", task.get_name(), within_s)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(_ASK_EVERY_S, left))
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("background task %s ended with %s: %s", task.get_name(), type(exc).__name__, exc)
    return True
