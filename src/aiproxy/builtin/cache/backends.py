"""Where cached answers live: in this process (LRU, bounded in entries and bytes) or in
Redis (shared by every replica, each value with its TTL).

Values are the answer's JSON bytes: a hit is parsed anew, so no stage can change a
stored answer by editing the one it was handed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("aiproxy.cache")
Clock = Callable[[], float]
LOG_EVERY = 60.0  # seconds between two warnings about an unreachable Redis
MAX_PENDING_WRITES = 256  # Redis writes in flight; past it a write is dropped (and counted)


class MemoryBackend:
    """An LRU of ``key → (expiry, bytes)``; a read past the expiry is a miss and drops it."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self.evictions = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self.clock() >= expires:
            del self._data[key]
            self.bytes -= len(value)
            return None
        self._data.move_to_end(key)
        return value

    def set(self, key: str, value: bytes, ttl: float) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(old[1])
        self._data[key] = (self.clock() + ttl, value)
        self.bytes += len(value)
        while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, dropped) = self._data.popitem(last=False)
            self.bytes -= len(dropped)
            self.evictions += 1


class RedisBackend:
    """``GET`` / ``SET … PX`` under ``<redis.prefix>cache:``. A failure is a miss (or a write
    not made), one warning a minute at most and a count; after one, Redis is left alone for
    ``retry`` seconds so a dead server costs no call a timeout. Writes run in the background."""

    def __init__(self, url: str, prefix: str, retry: float, clock: Clock = time.monotonic) -> None:
        from redis.asyncio import Redis

        self.prefix = f"{prefix}cache:"
        self.retry = retry
        self.clock = clock
        self.errors = 0
        self.dropped = 0
        self.redis: Any = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self._down_until = 0.0
        self._logged = -LOG_EVERY
        self._pending: set[asyncio.Task[None]] = set()

    def usable(self) -> bool:
        return self._down_until == 0.0 or self.clock() >= self._down_until

    def _failed(self, exc: BaseException, doing: str) -> None:
        self.errors += 1
        now = self.clock()
        self._down_until = now + self.retry if self.retry > 0 else 0.0
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            # the type only: a message may carry the server's address and credentials
            log.warning("cache: Redis failed on %s (%s); answering as a miss, trying again in %gs",
                        doing, type(exc).__name__, self.retry)

    async def get(self, key: str) -> bytes | None:
        if not self.usable():
            return None
        try:
            value = await self.redis.get(self.prefix + key)
        except Exception as exc:  # redis errors, OSError, timeouts: never the caller's problem
            self._failed(exc, "read")
            return None
        self._down_until = 0.0
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl: float) -> None:
        """Schedule the write; the response does not wait for it."""
        if not self.usable():
            return
        if len(self._pending) >= MAX_PENDING_WRITES:
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._write(key, value, ttl))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self.redis.set(self.prefix + key, value, px=max(1, int(ttl * 1000)))
        except Exception as exc:
            self._failed(exc, "write")

    async def settle(self, within: float = 5.0) -> None:
        """Wait for the writes in flight (at shutdown; tests, before they read back)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=within)

    async def aclose(self) -> None:
        await self.settle(2.0)
        for task in list(self._pending):
            task.cancel()
        await self.redis.aclose()
