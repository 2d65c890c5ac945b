"""One lookup for many callers: concurrent misses for the same key share one fetch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """``await flight(key)`` runs ``fetch(key)`` once for all callers waiting on that key.

    A caller that leaves (cancelled) does not cancel the fetch the others wait for; a
    failure reaches every waiter. :meth:`forget` makes later callers start a new fetch
    (the running one still answers those already waiting).
    """

    def __init__(self, fetch: Callable[[K], Awaitable[V]]) -> None:
        self._fetch = fetch
        self._pending: dict[K, asyncio.Future[V]] = {}

    async def __call__(self, key: K) -> V:
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key))
            self._pending[key] = task
            task.add_done_callback(lambda t: self._settled(key, t))
        return await asyncio.shield(task)

    def forget(self, key: K) -> None:
        self._pending.pop(key, None)

    def _settled(self, key: K, task: asyncio.Future[V]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved here; each waiter handles it
