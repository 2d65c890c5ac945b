"""Cooldowns (circuit breaking): a deployment that keeps failing is taken out for a while.

``cooldown.failures`` retryable failures within ``cooldown.window`` seconds open the
breaker for ``cooldown.duration`` seconds; after that the deployment is probed back in:
the next call may use it, a success closes the breaker, a failure (within another
window) opens it again at once.

:class:`LocalBreaker` keeps that state in process. :class:`RedisBreaker` shares it
between replicas through Redis (one Lua script per failure, so counting is atomic), and
reads it back at most once a second per pool, so a call that succeeds costs no round
trip. When Redis cannot be reached it says so once in the log and carries on with the
local state: the breaker store being down must not fail calls.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiproxy.routing.settings import Cooldown

log = logging.getLogger("aiproxy.routing")
SYNC_INTERVAL = 1.0
REDIS_RETRY_AFTER = 5.0

Clock = Callable[[], float]


@dataclass(slots=True)
class _State:
    failures: deque[float] = field(default_factory=deque)
    until: float = 0.0  # cooling down until then
    probe_until: float = 0.0  # after a cooldown, a failure before then re-opens at once


class LocalBreaker:
    """Cooldown state of one process."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._states: dict[str, _State] = {}

    def cooling(self, deployment: str) -> float:
        """Seconds ``deployment`` stays out; 0 when it may be used."""
        state = self._states.get(deployment)
        if state is None:
            return 0.0
        return max(0.0, state.until - self.clock())

    async def sync(self, deployments: Sequence[str]) -> None:
        """Refresh the view of shared state (nothing to do in process)."""

    async def failed(self, deployment: str, cooldown: Cooldown) -> bool:
        """Count a retryable failure; True when it (now) takes the deployment out."""
        return self.count_failure(deployment, cooldown)

    def count_failure(self, deployment: str, cooldown: Cooldown) -> bool:
        now = self.clock()
        state = self._states.setdefault(deployment, _State())
        if now < state.until:
            return True
        failures = state.failures
        while failures and failures[0] <= now - cooldown.window:
            failures.popleft()
        failures.append(now)
        if now < state.probe_until or len(failures) >= cooldown.failures:
            self.open(deployment, cooldown.duration, cooldown.window)
            return True
        return False

    def open(self, deployment: str, duration: float, window: float) -> None:
        now = self.clock()
        state = self._states.setdefault(deployment, _State())
        state.failures.clear()
        state.until = now + duration
        state.probe_until = state.until + window

    async def succeeded(self, deployment: str) -> None:
        """A success closes the breaker (forgets failures and any probe)."""
        self._states.pop(deployment, None)

    def troubled(self, deployment: str) -> bool:
        """Has this process seen ``deployment`` fail lately (worth telling a shared store)?"""
        return deployment in self._states

    async def aclose(self) -> None:
        pass


# KEYS: failures, cooldown, probe. ARGV: failures needed, window ms, duration ms.
# Returns the milliseconds the deployment stays out (0: still in).
_FAILED = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return left end
local duration, window = tonumber(ARGV[3]), tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('INCR', KEYS[1]) >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', duration)
  redis.call('SET', KEYS[3], '1', 'PX', duration + window)
  redis.call('DEL', KEYS[1])
  return duration
end
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], window) end
return 0
"""


class RedisBreaker(LocalBreaker):
    """Cooldown state shared through Redis; the in-process state is the view and the fallback."""

    def __init__(self, url: str, prefix: str = "aiproxy:", clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        from redis.asyncio import Redis

        self.prefix = f"{prefix}breaker:"
        self.redis: Any = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self._script = self.redis.register_script(_FAILED)
        self._synced: dict[tuple[str, ...], float] = {}
        self._down_until = 0.0

    def _keys(self, deployment: str) -> list[str]:
        base = self.prefix + deployment
        return [base + ":failures", base + ":cooldown", base + ":probe"]

    def _usable(self) -> bool:
        return self.clock() >= self._down_until

    def _down(self, exc: BaseException) -> None:
        if self._down_until == 0.0 or self.clock() >= self._down_until:
            log.warning("routing: Redis is unreachable for cooldown state (%s); using this "
                        "process's own state for %gs", type(exc).__name__, REDIS_RETRY_AFTER)
        self._down_until = self.clock() + REDIS_RETRY_AFTER

    async def sync(self, deployments: Sequence[str]) -> None:
        key = tuple(deployments)
        now = self.clock()
        if now - self._synced.get(key, -SYNC_INTERVAL) < SYNC_INTERVAL or not self._usable():
            return
        self._synced[key] = now
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for d in deployments:
                    pipe.pttl(self._keys(d)[1])
                left = await pipe.execute()
        except Exception as exc:  # redis errors, OSError, timeouts: never the caller's problem
            self._down(exc)
            return
        for d, ms in zip(deployments, left, strict=True):
            if isinstance(ms, int) and ms > 0:
                state = self._states.setdefault(d, _State())
                state.until = now + ms / 1000
                state.probe_until = max(state.probe_until, state.until)

    async def failed(self, deployment: str, cooldown: Cooldown) -> bool:
        if self._usable():
            try:
                ms = await self._script(keys=self._keys(deployment), args=[
                    cooldown.failures, int(cooldown.window * 1000), int(cooldown.duration * 1000)])
            except Exception as exc:
                self._down(exc)
            else:
                if int(ms) > 0:
                    self.open(deployment, int(ms) / 1000, cooldown.window)
                    return True
                self._states.setdefault(deployment, _State())  # remember to clear it on success
                return False
        return self.count_failure(deployment, cooldown)

    async def succeeded(self, deployment: str) -> None:
        if not self.troubled(deployment):
            return  # nothing this process knows of to clear: no round trip
        await super().succeeded(deployment)
        if self._usable():
            try:
                await self.redis.delete(*self._keys(deployment))
            except Exception as exc:
                self._down(exc)

    async def aclose(self) -> None:
        await self.redis.aclose()
