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

import os
from collections.abc import Sequence
from typing import Any, Protocol

Reserve = tuple[str, float, float, float, float]  # name, limit (<0: none), amount, seed, expires_at
Add = tuple[str, float, float, float]  # name, amount, seed, expires_at
#: seconds a process's journal outlives its last write: a write resent later than that
#: (Redis unreachable for two days) could count twice
JOURNAL_TTL = 2 * 86400


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
        return self.take(items)

    async def add(self, items: list[Add], now: float) -> None:
        self.grow(items)

    def take(self, items: list[Reserve]) -> tuple[int, float] | None:
        """Reserve every item, or none: (index, used) of the first that does not fit."""
        values = self.values
        for index, (name, limit, amount, seed, _) in enumerate(items):
            entry = values.get(name)
            used = seed if entry is None else entry[0]
            if limit >= 0 and (used >= limit or used + amount > limit):
                return index, used
        for name, _, amount, seed, expires in items:
            self._grow(name, amount, seed, expires)
        return None

    def grow(self, items: list[Add]) -> None:
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


# KEYS[1]: this process's journal (a hash of its writes' numbers); then the counters.
# ARGV: "reserve" or "add"; this write's number (0: not journaled); the number of an earlier
# reservation whose amounts to use if it was applied (0: none); how many numbers to forget,
# and those; then five per counter: limit (<0: none), amount, seed, ttl in ms, amount if
# that reservation was applied. A write whose number is in the journal was applied before
# (its answer was lost): it changes nothing, and answers as admitted.
_SCRIPT = """
local journal = KEYS[1]
local forget = tonumber(ARGV[4])
for i = 1, forget do redis.call('HDEL', journal, ARGV[4 + i]) end
local write = ARGV[2]
if write ~= '0' and redis.call('HEXISTS', journal, write) == 1 then return {0} end
local base = 4 + forget
local n = #KEYS - 1
if ARGV[1] == 'reserve' then
  for i = 1, n do
    local b = base + (i - 1) * 5
    local limit = tonumber(ARGV[b + 1])
    if limit >= 0 then
      local used = tonumber(redis.call('GET', KEYS[i + 1]) or ARGV[b + 3])
      if used >= limit or used + tonumber(ARGV[b + 2]) > limit then
        return {i, tostring(used)}
      end
    end
  end
end
local held = false
if ARGV[3] ~= '0' then
  held = redis.call('HDEL', journal, ARGV[3]) == 1
  -- not applied: void its number, so that reservation changes nothing should it still come
  if not held then redis.call('HSET', journal, ARGV[3], 0) end
end
for i = 1, n do
  local b = base + (i - 1) * 5
  local amount = ARGV[b + 2]
  if held then amount = ARGV[b + 5] end
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    if tonumber(amount) ~= 0 or tonumber(ARGV[b + 3]) ~= 0 then
      redis.call('SET', KEYS[i + 1], ARGV[b + 3], 'PX', ARGV[b + 4])
    end
  end
  if tonumber(amount) ~= 0 then redis.call('INCRBYFLOAT', KEYS[i + 1], amount) end
end
if write ~= '0' then
  redis.call('HSET', journal, write, 1)
  redis.call('PEXPIRE', journal, JOURNAL_MS)
end
return {0}
""".replace("JOURNAL_MS", str(JOURNAL_TTL * 1000))


class RedisCounters:
    """Shared by every replica on one Redis; they survive a gateway restart.

    Each write may carry a number of this process's own (``write``): the script applies it
    once, recording the number in the process's journal in Redis, so a write whose answer
    was lost (a timeout, a reset) can be sent again as it was without counting twice. A
    number is forgotten (``forget``, sent with a later write) once its answer is known.
    An add may name an earlier reservation (``held``) whose answer was lost: if Redis took
    it, the add's ``alt`` amounts are used instead (the reservation taken into account);
    if not, its number is voided, so it changes nothing should it arrive after all.
    """

    remote = True

    def __init__(self, url: str, prefix: str, *, timeout: float = 0.5, journal: str = "") -> None:
        from redis.asyncio import Redis

        self.prefix = prefix
        self.journal = f"{prefix}journal:{journal or os.urandom(8).hex()}"
        self.redis: Any = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        self._script = self.redis.register_script(_SCRIPT)

    async def reserve(self, items: list[Reserve], now: float, *, write: int = 0,
                      forget: Sequence[int] = ()) -> tuple[int, float] | None:
        args: list[str | int] = ["reserve", write, 0, len(forget), *forget]
        for _, limit, amount, seed, expires in items:
            n = _num(amount)
            args += [_num(limit), n, _num(seed), _ttl(expires, now), n]
        got = await self._script(keys=[self.journal, *(self.prefix + item[0] for item in items)], args=args)
        index = int(got[0])
        return None if index == 0 else (index - 1, float(got[1]))

    async def add(self, items: list[Add], now: float, *, write: int = 0, forget: Sequence[int] = (),
                  held: int = 0, alt: Sequence[float] | None = None) -> None:
        args: list[str | int] = ["add", write, held, len(forget), *forget]
        for i, (_, amount, seed, expires) in enumerate(items):
            n = _num(amount)
            args += ["-1", n, _num(seed), _ttl(expires, now), n if alt is None else _num(alt[i])]
        await self._script(keys=[self.journal, *(self.prefix + item[0] for item in items)], args=args)

    async def aclose(self) -> None:
        await self.redis.aclose()


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(float(value))


def _ttl(expires: float, now: float) -> str:
    return str(max(1000, int((expires - now) * 1000)))
