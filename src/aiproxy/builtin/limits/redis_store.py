"""GCRA state shared by replicas through Redis: one Lua script per check, run atomically.

Every limit a call touches is checked and charged in one script (all or nothing), so
two replicas sharing one Redis admit exactly the limit between them. The script reads
the time from Redis itself (``TIME``): the replicas' clocks never disagree. It is sent
once and then run by its SHA (EVALSHA; redis-py loads it again on NOSCRIPT, after a
Redis restart). A counter's key expires once its bucket is full again, so idle keys,
users and tenants leave nothing behind; a call that outlasts its reservation settles on
the tat its own take left (the take answers Redis's time for that). The keys of one call
must live on one Redis (a single instance or a primary with replicas, not a cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiproxy.builtin.limits.gcra import Rule, Verdict

# KEYS: one counter per rule. ARGV: per rule, emission interval (ms), cost, window (ms).
# Returns {failed rule (0: admitted), wait ms, now ms, then per rule tat - now in ms}; tats are
# stored with %.17g so they round-trip exactly, and expire when the bucket is full.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local before, after = {}, {}
local failed, wait = 0, 0
for i = 1, #KEYS do
  local period, cost, window = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  before[i] = tat
  after[i] = tat + cost * period
  local over = after[i] - now - window
  if over > 0.01 and over > wait then failed, wait = i, over end
end
local out = {failed, string.format('%.17g', wait), string.format('%.17g', now)}
for i = 1, #KEYS do
  if failed == 0 then
    redis.call('SET', KEYS[i], string.format('%.17g', after[i]), 'PX', math.ceil(after[i] - now) + 1000)
    out[i + 3] = string.format('%.17g', after[i] - now)
  else
    out[i + 3] = string.format('%.17g', before[i] - now)
  end
end
return out
"""

# KEYS: counters; ARGV: per counter, ms to add to its tat (negative: a refund), and the tat
# (ms) the call's take left: a counter that expired meanwhile (full again) is charged from it.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
for i = 1, #KEYS do
  local add = tonumber(ARGV[2*i-1])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if not tat and add > 0 then tat = tonumber(ARGV[2*i]) end
  if tat then
    tat = tat + add
    if tat > now then
      redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', math.ceil(tat - now) + 1000)
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 0
"""


class RedisStore:
    """The same two operations as LocalStore, as one round trip each; raises on any failure."""

    def __init__(self, url: str, timeout: float = 0.5) -> None:
        from redis.asyncio import Redis

        self.redis: Any = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        self._take = self.redis.register_script(_TAKE)
        self._settle = self.redis.register_script(_SETTLE)

    async def take(self, rules: Sequence[Rule]) -> Verdict:
        args: list[float | int] = []
        for rule in rules:
            args += [rule.period * 1000, rule.cost, rule.window * 1000]
        out = await self._take(keys=[r.key for r in rules], args=args)
        failed = int(out[0])
        at = float(out[2]) / 1000
        ahead = [float(v) / 1000 for v in out[3:]]
        if failed:
            return Verdict(False, ahead, failed - 1, float(out[1]) / 1000, at)
        return Verdict(True, ahead, at=at)

    async def settle(self, rules: Sequence[Rule], delta: int, taken: Sequence[float]) -> None:
        """Add ``delta`` units to each counter; ``taken[i]``: the tat (Redis's seconds) rule
        ``i``'s take left, for a counter that expired meanwhile."""
        args: list[float] = []
        for rule, mine in zip(rules, taken, strict=True):
            args += [delta * rule.period * 1000, mine * 1000]
        await self._settle(keys=[r.key for r in rules], args=args)

    async def aclose(self) -> None:
        await self.redis.aclose()
