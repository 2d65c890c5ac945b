"""Spend per tenant per month (UTC), and one alert when it crosses the threshold.

Spend is counted in integer nano-dollars (each call's exact cost rounded to the nearest
nano-dollar, then summed without float drift). Without Redis the running totals
live in this process. With Redis, calls add to a local batch that a background task
flushes every ``flush_interval`` seconds (one script adding it for all tenants, so a
call never waits on Redis); the flush learns the shared total, and the replica whose
mark for the tenant and period holds its name sends the alert: one alert per tenant per
period however many replicas there are (a mark set by an attempt whose answer was lost
is still this replica's, so that alert is not lost either).

A flush whose answer does not come back (a timeout, a connection reset) may still have
been applied. Each batch is numbered, and the script applies it only if it is past the
last number this process had applied (kept in Redis under the process's own random
name, atomically with the totals); an unanswered batch is sent again as it was, under
its number, before anything newer. So a batch counts exactly once however often it
is sent, and spend made meanwhile waits for the next batch. An alert is sent off the response
path; a failure is logged and counted, never the caller's problem, and is not retried
later in the period.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from aiproxy.builtin.cost.notifiers import Alert, AlertStats, Notifiers

log = logging.getLogger("aiproxy.cost")
NANO = Decimal(1_000_000_000)
MARK_TTL = 62 * 24 * 3600  # seconds: a period's keys outlive it, then go

# KEYS[1]: this process's applied-mark (the number of the last batch it applied); then the
# spend counters. ARGV: the batch's number, the TTL in seconds, then nano-dollars per counter.
# Returns each counter's total after the batch (which may have been applied before).
_ADD = """
local applied = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > applied then
  for i = 2, #KEYS do
    redis.call('INCRBY', KEYS[i], ARGV[i + 1])
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
redis.call('SET', KEYS[1], math.max(applied, tonumber(ARGV[1])), 'EX', ARGV[2])
local out = {}
for i = 2, #KEYS do out[i - 1] = redis.call('GET', KEYS[i]) or '0' end
return out
"""

# KEYS[1]: a tenant's alerted-mark for the period; ARGV: this process's name, the TTL in seconds.
# 1: this process holds the mark (set now, or by an earlier try whose answer was lost): it alerts.
_MARK = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
if holder == ARGV[1] then return 1 end
return 0
"""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def period_of(now: dt.datetime) -> str:
    return f"{now.year:04d}-{now.month:02d}"


class Spend:
    """Running spend per tenant in the current period, and the once-per-period mark."""

    def __init__(self, threshold: Decimal, notifiers: Notifiers, *, redis_url: str | None = None,
                 prefix: str = "aiproxy:", flush_interval: float = 1.0) -> None:
        self.threshold = threshold
        self.limit = int(threshold * NANO)  # nano-dollars
        self.notifiers = notifiers
        self.now: Callable[[], dt.datetime] = utcnow
        self.stats = AlertStats()
        self.flush_interval = flush_interval
        self.prefix = f"{prefix}cost:"
        self.redis: Any = None
        self._add_script: Any = None
        self._mark_script: Any = None
        if redis_url:
            from redis.asyncio import Redis

            try:
                self.redis = Redis.from_url(redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
            except ValueError:  # not a URL redis can use (not logged: it may hold a password)
                log.warning("cost: redis.url is not a redis:// URL; spend totals stay in process")
            else:
                self._add_script = self.redis.register_script(_ADD)
                self._mark_script = self.redis.register_script(_MARK)
        self.totals: dict[tuple[str, str], int] = {}  # in process: (tenant, period) → nanos
        self.pending: dict[tuple[str, str], int] = {}  # with Redis: not yet in a batch
        self.unacked: tuple[int, dict[tuple[str, str], int]] | None = None  # sent, answer unknown
        self._numbered = 0  # batches numbered so far
        self._name = os.urandom(8).hex()  # this process, in the marks it holds in Redis
        self._applied_mark = f"{self.prefix}applied:{self._name}"
        self.marked: set[tuple[str, str]] = set()  # alerted (here or, with Redis, anywhere)
        self.owed: dict[tuple[str, str], int] = {}  # with Redis: crossed, mark not yet set
        self._period = ""
        self._year = self._month = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._flushing: asyncio.Future[None] | None = None  # the flush in flight, if any
        self._failing = False

    # ------------------------------------------------------------ per call (sync, in memory)
    def add(self, tenant: str, nanos: int) -> None:
        """Count ``nanos`` (USD x 10**9) to ``tenant`` in the current period."""
        if nanos <= 0:
            return
        now = self.now()
        if now.month != self._month or now.year != self._year:  # a new month: last month's state can go
            self._year, self._month = now.year, now.month
            self._period = period = period_of(now)
            self.marked = {k for k in self.marked if k[1] == period}
            self.totals = {k: v for k, v in self.totals.items() if k[1] == period}
        period = self._period
        key = (tenant, period)
        if self.redis is not None:
            self.pending[key] = self.pending.get(key, 0) + nanos
            return
        total = self.totals[key] = self.totals.get(key, 0) + nanos
        if total >= self.limit and key not in self.marked:
            self.marked.add(key)
            self._alert(Alert(tenant, period, Decimal(total) / NANO, self.threshold, now))

    def _alert(self, alert: Alert) -> None:
        task = asyncio.get_running_loop().create_task(self.notifiers.send(alert, self.stats))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ Redis batches
    def start(self) -> None:
        if self.redis is not None and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            # shielded: a shutdown cancelling the loop must not cancel a flush in flight,
            # which has taken the batch (aclose waits for it, then flushes what is left)
            self._flushing = asyncio.ensure_future(self._flush_logged())
            await asyncio.shield(self._flushing)

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except Exception:  # a bug must not stop the flushing for good
            log.exception("cost: flushing spend totals failed")

    async def flush(self) -> None:
        """Add the batch to the shared totals; alert for a tenant that crossed (once)."""
        if self.redis is None or not (self.pending or self.owed or self.unacked):
            return
        for _ in range(2):  # a batch left unanswered last time, then the spend since
            if self.unacked is None:
                if not self.pending:
                    break
                self._numbered += 1
                self.unacked, self.pending = (self._numbered, self.pending), {}
            number, batch = self.unacked
            keys = list(batch)
            try:
                replies = await self._add_script(
                    keys=[self._applied_mark, *(f"{self.prefix}spend:{p}:{t}" for t, p in keys)],
                    args=[number, MARK_TTL, *batch.values()])
            except Exception as exc:  # maybe applied: sent again as it is, under its number
                self._failed(exc)
                return
            if self.unacked is not None and self.unacked[0] == number:
                self.unacked = None
            for key, reply in zip(keys, replies, strict=True):
                total = int(reply)
                if total >= self.limit and key not in self.marked:
                    self.owed[key] = total
        for (tenant, period), total in list(self.owed.items()):
            try:  # the replica that holds the mark sends the alert
                won = await self._mark_script(keys=[f"{self.prefix}alerted:{period}:{tenant}"],
                                              args=[self._name, MARK_TTL])
            except Exception as exc:  # still owed: the next flush tries again
                self._failed(exc)
                return
            del self.owed[(tenant, period)]
            self.marked.add((tenant, period))
            if won:
                self._alert(Alert(tenant, period, Decimal(total) / NANO, self.threshold, self.now()))
        if self._failing:
            self._failing = False
            log.info("cost: Redis is back; spend totals flushed")

    def _failed(self, exc: Exception) -> None:
        self.stats.backend_errors += 1
        if not self._failing:
            self._failing = True
            log.warning("cost: Redis unavailable for spend totals (%s); keeping them until it "
                        "is back", type(exc).__name__)

    async def aclose(self, wait: float = 15.0) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._flushing is not None:
            await self._flushing  # never raises: _flush_logged logs
            self._flushing = None
        await self.flush()
        if self.pending or self.unacked:
            log.warning("cost: Redis unavailable at shutdown; the spend of %d tenant(s) since the last "
                        "flush may not be in the shared totals",
                        len(set(self.pending) | set(self.unacked[1] if self.unacked else ())))
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=wait)
            for task in late:
                task.cancel()
        await self.notifiers.aclose()
        if self.redis is not None:
            await self.redis.aclose()

    async def settled(self) -> None:
        """Wait for the alerts being sent (tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
