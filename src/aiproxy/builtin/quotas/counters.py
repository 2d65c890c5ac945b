"""Where the running counters live: this process (default) or Redis (``redis.url``).

A counter is a number under a name that includes its period
(``tok:key:key_1:2026-11`` in tokens, ``usd:user:usr_1:2026-11-27`` in whole
nano-dollars), created at its ``seed``
the first time it is touched and dropped a day after its period ends. Both backends
take the same items and answer the same way:

- ``reserve(items, now)``: every item is ``(name, limit, amount, seed, expires_at)``.
  If any counter is at or past its limit, or would pass it by ``amount``, nothing
  changes and the answer is ``(index, used)`` of the first such item; otherwise each
  counter grows by its amount and the answer is None. In Redis this is one Lua
  script, so replicas never both take the last of a quota.
- ``add(items, now)``: ``(name, amount, seed, expires_at)``; grow (or, negative,
  shrink) each counter, no check.
"""

from __future__ import annotations

from typing import Any, Protocol

Reserve = tuple[str, float, float, float, float]  # name, limit (<0: none), amount, seed, expires_at
Add = tuple[str, float, float, float]  # name, amount, seed, expires_at


class Counters(Protocol):
    remote: bool

    async def reserve(self, items: list[Reserve], now: float) -> tuple[int, float] | None: ...

    async def add(self, items: list[Add], now: float) -> None: ...

    async def aclose(self) -> None: ...


class LocalCounters:
    """In this process: exact for one process; lost on restart (keys' own are re-seeded)."""

    remote = False

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}  # name → [value, expires_at]

    async def reserve(self, items: list[Reserve], now: float) -> tuple[int, float] | None:
        values = self.values
        for index, (name, limit, amount, seed, _) in enumerate(items):
            entry = values.get(name)
            used = seed if entry is None else entry[0]
            if limit >= 0 and (used >= limit or used + amount > limit):
                return index, used
        for name, _, amount, seed, expires in items:
            self._grow(name, amount, seed, expires)
        return None

    async def add(self, items: list[Add], now: float) -> None:
        for name, amount, seed, expires in items:
            self._grow(name, amount, seed, expires)

    def _grow(self, name: str, amount: float, seed: float, expires: float) -> None:
        entry = self.values.get(name)
        if entry is None:
            if amount or seed:
                self.values[name] = [seed + amount, expires]
        else:
            entry[0] += amount

    def get(self, name: str) -> float | None:
        entry = self.values.get(name)
        return None if entry is None else entry[0]

    def sweep(self, now: float) -> None:
        """Drop the counters of periods that are over."""
        for name in [n for n, (_, expires) in self.values.items() if expires <= now]:
            del self.values[name]

    async def aclose(self) -> None:
        return None


# ARGV[1]: "reserve" or "add"; then four per key: limit (<0: none), amount, seed, ttl in ms.
_SCRIPT = """
local n = #KEYS
if ARGV[1] == 'reserve' then
  for i = 1, n do
    local b = 2 + (i - 1) * 4
    local limit = tonumber(ARGV[b])
    if limit >= 0 then
      local used = tonumber(redis.call('GET', KEYS[i]) or ARGV[b + 2])
      if used >= limit or used + tonumber(ARGV[b + 1]) > limit then
        return {i, tostring(used)}
      end
    end
  end
end
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local amount = tonumber(ARGV[b + 1])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    if amount ~= 0 or tonumber(ARGV[b + 2]) ~= 0 then
      redis.call('SET', KEYS[i], ARGV[b + 2], 'PX', ARGV[b + 3])
    end
  end
  if amount ~= 0 then redis.call('INCRBYFLOAT', KEYS[i], ARGV[b + 1]) end
end
return {0}
"""


class RedisCounters:
    """Shared by every replica on one Redis; they survive a gateway restart."""

    remote = True

    def __init__(self, url: str, prefix: str, *, timeout: float = 0.5) -> None:
        from redis.asyncio import Redis

        self.prefix = prefix
        self.redis: Any = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        self._script = self.redis.register_script(_SCRIPT)

    async def reserve(self, items: list[Reserve], now: float) -> tuple[int, float] | None:
        args: list[str] = ["reserve"]
        for _, limit, amount, seed, expires in items:
            args += [_num(limit), _num(amount), _num(seed), _ttl(expires, now)]
        got = await self._script(keys=[self.prefix + item[0] for item in items], args=args)
        index = int(got[0])
        return None if index == 0 else (index - 1, float(got[1]))

    async def add(self, items: list[Add], now: float) -> None:
        args: list[str] = ["add"]
        for _, amount, seed, expires in items:
            args += ["-1", _num(amount), _num(seed), _ttl(expires, now)]
        await self._script(keys=[self.prefix + item[0] for item in items], args=args)

    async def aclose(self) -> None:
        await self.redis.aclose()


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(float(value))


def _ttl(expires: float, now: float) -> str:
    return str(max(1000, int((expires - now) * 1000)))
