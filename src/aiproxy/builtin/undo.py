"""A shared-store write that must not be cut in half by the caller's cancellation.

A call's task can be cancelled while a script runs in Redis for it (a shutdown past
its grace period; anything that cancels the request). Cancelling the await does not
cancel the script: Redis may already have taken what it takes, and the caller, gone,
never records it, so nothing ever gives it back. :func:`finish_or_undo` lets the
write run to its answer whatever happens to the caller; if the caller was cancelled
meanwhile, ``undo`` is handed that answer to give back what was taken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def finish_or_undo(work: Coroutine[Any, Any, T], undo: Callable[[T], Awaitable[None] | None],
                         tasks: set[asyncio.Task[Any]]) -> T:
    """Await ``work`` (run as a task of its own, so cancelling this await leaves it running);
    cancelled, call ``undo(result)`` once it ends well. ``tasks`` holds what is still
    running, for a shutdown to wait for."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        tasks.add(task)
        task.add_done_callback(lambda t: _undo(t, undo, tasks))
        raise


def _undo(task: asyncio.Task[T], undo: Callable[[T], Awaitable[None] | None],
          tasks: set[asyncio.Task[Any]]) -> None:
    tasks.discard(task)
    if task.cancelled() or task.exception() is not None:  # nothing was taken (or it is unknown)
        return
    pending = undo(task.result())
    if pending is not None:
        follow = asyncio.ensure_future(pending)
        tasks.add(follow)
        follow.add_done_callback(tasks.discard)


async def settled(tasks: set[asyncio.Task[Any]]) -> None:
    """Wait for the writes (and their undoing) still running; their errors are theirs."""
    while tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)
