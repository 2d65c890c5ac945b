"""The quotas stage: check (and reserve) in before-call, account in after-call and on-error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette

from aiproxy import hookimpl, tokens
from aiproxy.builtin.quotas.backend import SharedCounters, Unsure
from aiproxy.builtin.quotas.counters import Add, Counters, LocalCounters, RedisCounters, Reserve
from aiproxy.builtin.quotas.periods import GRACE, Calendar, Periods
from aiproxy.builtin.quotas.rules import NONE, Rules, rules_for
from aiproxy.builtin.quotas.settings import parse
from aiproxy.builtin.quotas.writeback import UsageWriter
from aiproxy.call import Call, Principal
from aiproxy.config import Config
from aiproxy.errors import ProxyError

log = logging.getLogger("aiproxy.quotas")
#: budgets are counted in whole nano-dollars: a float sum of costs drifts (ten calls of
#: $0.10 came to 0.9999999999999999, under a $1 cap); whole numbers add exactly (in
#: process up to 2**53 nano-dollars, $9M; Redis's INCRBYFLOAT is exact further)
NANO = 1_000_000_000


@dataclass(slots=True)
class Held:
    """What a call took in before-call, to settle when it ends."""

    tokens: list[tuple[str, float, float, float]]  # counter, tokens reserved, seed, expires_at
    usd: list[tuple[str, float]]  # counter, expires_at
    key_id: str | None  # the api_keys row its tokens are written back to
    month: str
    unsure: tuple[int, float] | None = None  # a reservation Redis may have taken: its write, amount


@dataclass(slots=True)
class Plan:
    """One caller's rules, with their counters named for the current UTC day."""

    key_id: str
    rules: Rules
    write_back: bool  # a key in the database: its tokens go back to its row
    count_own: bool  # in process, the key's month is counted even with no rule on it
    day: str = ""  # the day the names below are for
    tokens: tuple[tuple[str, float, bool, float], ...] = ()  # counter, limit, own key's, expires_at
    budgets: tuple[tuple[str, float, float], ...] = ()  # counter, cap (nano-dollars), expires_at
    own: tuple[str, float] | None = None  # the key's own counter when no rule is on it
    seeded: bool = False  # a counter here starts from the key's stored usage


_UNKNOWN = object()


class Quotas(SharedCounters):
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = parse(config.sections.get("quotas"), config.source)
        self.clock = clock  # epoch seconds; periods are UTC days and months of it
        self.redis_url = config.redis_url
        self.prefix = str(config.section("redis").get("prefix") or "aiproxy:") + "quotas:"
        self.counters: Counters = LocalCounters()
        self.writer: UsageWriter | None = None
        self.calendar = Calendar()
        self._plans: dict[tuple[Any, ...], Plan | None] = {}
        self._periods: Periods | None = None
        self._owed: dict[str, list[float]] = {}  # counter → [amount, seed, expires_at]
        self._down_until = 0.0
        self._logged_at = -math.inf
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()  # ends the periodic task between two ticks, never within one
        self._stopped = False  # shut down: a call ending now is past the last flush
        self._repaying = False
        self._writes = 0  # numbers of this process's writes to Redis (its journal there)
        self._forget: list[int] = []  # writes whose answer came: forgotten with the next write
        self._unsure: dict[int, tuple[list[Add], int, list[float] | None]] = {}  # write → items,
        # held, alt: sent with no answer (or waiting to be sent): sent again as they were
        self.backend_errors = 0
        self.refused = 0
        self.lost = 0

    # ------------------------------------------------------------ lifecycle
    @hookimpl
    async def aiproxy_startup(self, app: Starlette) -> None:
        self._stopped = False
        self._stop = asyncio.Event()
        engine = getattr(app.state, "database", None)
        if engine is not None:
            self.writer = UsageWriter(engine)
        if self.redis_url:
            try:
                self.counters = RedisCounters(self.redis_url, self.prefix)
            except ValueError:  # not logged: the URL may hold a password
                log.warning("quotas: redis.url is not a redis:// URL; counters stay in this process")
        hooks = getattr(app.state, "hooks", None)
        costed = hooks is not None and "cost" in hooks.implementers("aiproxy_after_call")
        if self.settings.has_budgets and not costed:
            log.warning("quotas: budgets are configured but the cost plugin is disabled (or sets no "
                        "call.cost), so no spend is counted against them")
        if self.settings.flush_interval > 0:
            self._task = asyncio.create_task(self._every(self.settings.flush_interval))

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        if self._task is not None:
            # not cancel(): a tick cancelled within its flush lost the batch it had taken
            self._stop.set()
            await self._task
            self._task = None
        await self.tick()
        if self._owed or self._unsure:  # one last try, whatever the retry window says
            try:
                await self._repay(self.clock())
            except Exception as exc:
                lost = len(self._owed) + sum(len(w[0]) for w in self._unsure.values())
                self.lost += lost
                log.warning("quotas: %d counter increment(s) could not reach Redis before shutdown (%s) "
                            "and are lost", lost, type(exc).__name__)
        await self.counters.aclose()
        self._stopped = True

    async def tick(self) -> None:
        """The periodic work: write keys' usage back, drop finished periods, pay Redis what it is owed."""
        if self.writer is not None:
            await self.writer.flush()
        now = self.clock()
        if isinstance(self.counters, LocalCounters):
            self.counters.sweep(now)
        elif (self._owed or self._unsure) and now >= self._down_until:
            try:
                await self._repay(now)
            except Exception as exc:
                self._failed(exc, now)

    async def _every(self, seconds: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)
                return
            try:
                await self.tick()
            except Exception:
                log.exception("quotas: periodic flush failed")

    @hookimpl
    def aiproxy_stats(self) -> dict[str, float]:
        return {"aiproxy_quotas_backend_errors_total": float(self.backend_errors),
                "aiproxy_quotas_refused_total": float(self.refused),
                "aiproxy_quotas_lost_increments_total": float(self.lost),
                "aiproxy_quotas_unwritten_keys": float(len(self.writer.pending) if self.writer else 0)}

    # ------------------------------------------------------------ before the call
    @hookimpl
    def aiproxy_before_call(self, call: Call) -> Awaitable[None] | None:
        """In process: done here, no coroutine. Over Redis: the awaitable that reserves."""
        p = call.principal
        if p is None or p.kind == "master" or call.operation == "count_tokens":
            return None
        plan = self.plan(p)
        if plan is None:
            return None  # no quota, no budget, nothing to write back: no work at all
        now = self.clock()
        periods = self.calendar.at(now)
        if plan.day != periods.day.name:
            self._fill(plan, periods)
        seed = _stored_usage(p, periods.month.name) if plan.seeded else 0.0
        estimate = 0
        items: list[Reserve] = []
        if plan.tokens:
            estimate = (tokens.prompt_of(call)
                        + tokens.max_completion(call.body, self.settings.completion_estimate))
            items = [(name, limit, estimate, seed if own else 0.0, expires)
                     for name, limit, own, expires in plan.tokens]
        if plan.budgets:
            items += [(name, cap, 0.0, 0.0, expires) for name, cap, expires in plan.budgets]
        counters = self.counters
        refused: tuple[int, float] | None = None
        if items:
            if not isinstance(counters, LocalCounters):  # Redis: a round trip to await
                return self._reserve_then_hold(call, plan, periods, seed, estimate, items, now)
            refused = counters.take(items)
        self._hold(call, plan, periods, seed, estimate, items, now, refused)
        return None

    async def _reserve_then_hold(self, call: Call, plan: Plan, periods: Periods, seed: float,
                                 estimate: int, items: list[Reserve], now: float) -> None:
        self._hold(call, plan, periods, seed, estimate, items, now, await self._reserve(items, now))

    def _hold(self, call: Call, plan: Plan, periods: Periods, seed: float, estimate: int,
              items: list[Reserve], now: float, refused: tuple[int, float] | object | None) -> None:
        """Refuse the call (429), or record what it holds for settle."""
        reserved = 0.0
        unsure = None
        if items:
            if isinstance(refused, tuple):
                self.refused += 1
                raise self._refusal(plan.rules, refused, estimate, periods, now)
            if refused is None:
                reserved = float(estimate)
            elif isinstance(refused, Unsure):
                unsure = (refused.write, float(estimate))
        held = [(name, reserved, seed if own else 0.0, expires) for name, _, own, expires in plan.tokens]
        if plan.own is not None:
            held.append((plan.own[0], 0.0, seed, plan.own[1]))
        assert call.principal is not None
        call.state["quotas"] = Held(held, [(name, expires) for name, _, expires in plan.budgets],
                                    call.principal.id if plan.write_back else None,
                                    periods.month.name, unsure)

    def plan(self, p: Principal) -> Plan | None:
        """What the stage does for ``p`` (None: nothing), remembered per caller."""
        key = (p.kind, p.id, p.tier, p.user, p.tenant, p.metadata.get("monthly_limit_tokens"))
        plan = self._plans.get(key, _UNKNOWN)
        if plan is _UNKNOWN:
            if len(self._plans) >= 50_000:
                self._plans.clear()
            plan = self._plans[key] = self._new_plan(p)
        return plan  # type: ignore[return-value]

    def _new_plan(self, p: Principal) -> Plan | None:
        rules = rules_for(self.settings, p)
        is_key = p.kind == "key"
        write_back = self.writer is not None and is_key and not p.metadata.get("declared")
        count_own = is_key and not self.counters.remote  # in process, every key's month is kept
        if rules is NONE and not write_back and not count_own:
            return None
        return Plan(p.id, rules, write_back, count_own and not any(r.own_key for r in rules.tokens))

    def _fill(self, plan: Plan, periods: Periods) -> None:
        """Name the plan's counters for the day and month ``periods`` holds."""
        if periods is not self._periods:
            self._periods = periods
            if isinstance(self.counters, LocalCounters):
                self.counters.sweep(periods.day.start)  # a new day: drop what is over
        month, day = periods.month, periods.day
        plan.day = day.name
        plan.tokens = tuple((f"tok:{r.scope}:{r.ident}:{month.name}", float(r.limit), r.own_key,
                             month.end + GRACE) for r in plan.rules.tokens)
        plan.budgets = tuple((f"usd:{b.scope}:{b.ident}:{(day if b.daily else month).name}",
                              float(round(b.cap * NANO)),
                              (day if b.daily else month).end + GRACE) for b in plan.rules.budgets)
        plan.own = (f"tok:key:{plan.key_id}:{month.name}", month.end + GRACE) if plan.count_own else None
        plan.seeded = plan.own is not None or any(r.own_key for r in plan.rules.tokens)

    def _refusal(self, rules: Rules, refused: tuple[int, float], estimate: int, periods: Periods,
                 now: float) -> ProxyError:
        index, used = refused
        n = len(rules.tokens)
        period = periods.day if index >= n and rules.budgets[index - n].daily else periods.month
        wait = max(1, math.ceil(period.end - now))
        when = f"It resets at {period.resets}; retry after {wait} seconds."
        if index < n:
            rule = rules.tokens[index]
            need = f"; this request may need up to {estimate:,} more" if used < rule.limit else ""
            return ProxyError(429, f"Quota exceeded: {rule.label} is {rule.limit:,} tokens and "
                              f"{used:,.0f} are used in {period.name} (UTC){need}. {when}",
                              type="insufficient_quota", code="insufficient_quota",
                              headers={"retry-after": str(wait)})
        budget = rules.budgets[index - n]
        return ProxyError(429, f"Budget exceeded: {budget.label} is {_usd(budget.cap)} and "
                          f"{_usd(used / NANO)} has been spent in {period.name} (UTC). {when}",
                          type="insufficient_quota", code="budget_exceeded",
                          headers={"retry-after": str(wait)})

    # ------------------------------------------------------------ after the call
    @hookimpl
    def aiproxy_after_call(self, call: Call) -> Awaitable[None] | None:
        return self._settle(call)

    @hookimpl
    def aiproxy_on_error(self, call: Call) -> Awaitable[None] | None:
        return self._settle(call)  # a failed call counts what it used (a stream cut short)

    async def settle(self, call: Call) -> None:
        """Replace the reservation by the tokens used; add the spend (``call.cost``)."""
        pending = self._settle(call)
        if pending is not None:
            await pending

    def _settle(self, call: Call) -> Awaitable[None] | None:
        """:meth:`settle`, done here in process; over Redis (or at shutdown), the awaitable."""
        held: Held | None = call.state.pop("quotas", None)
        if held is None:
            return None
        usage = call.usage
        # a cache hit cost nothing; an answer the upstream sent no usage for has the gateway's
        # estimate; a failure with nothing produced has none
        used = 0 if call.cached or usage is None else usage.total_tokens
        unsure = held.unsure
        items: list[Add] = [(name, used - reserved, seed, expires) for name, reserved, seed, expires
                            in held.tokens if used != reserved or unsure is not None]
        # a reservation whose answer was lost (it held nothing here): if Redis took it after
        # all, the add comes to what it would have settled (held tokens are all reserved ones)
        alt = None if unsure is None else [amount - unsure[1] for _, amount, _, _ in items]
        cost = call.cost
        if cost is not None and 0 < cost < math.inf:  # None: no cost stage said; count nothing
            nanos = float(round(cost * NANO))
            items += [(name, nanos, 0.0, expires) for name, expires in held.usd]
            if alt is not None:
                alt += [nanos] * len(held.usd)
        write_back = held.key_id is not None and self.writer is not None
        counters = self.counters
        if not isinstance(counters, LocalCounters) or (write_back and self._stopped):
            return self._settle_later(held, used, items, alt)
        if items:
            counters.grow(items)
        if write_back:
            assert self.writer is not None and held.key_id is not None
            self.writer.add(held.key_id, held.month, used)
        return None

    async def _settle_later(self, held: Held, used: int, items: list[Add], alt: list[float] | None) -> None:
        unsure = held.unsure
        if items:
            await self._add(items, self.clock(), unsure[0] if unsure is not None else 0, alt)
        if held.key_id is not None and self.writer is not None:
            self.writer.add(held.key_id, held.month, used)
            if self._stopped:  # a stream cut at shutdown ends after the last flush: write it now
                await self.writer.flush()
                with contextlib.suppress(Exception):
                    await self.writer.engine.dispose()  # the database stage closed it before


def _stored_usage(p: Principal, month: str) -> float:
    """The key's usage as last written back, when it is this month's."""
    usage = p.metadata.get("current_usage")
    return float(usage) if p.metadata.get("usage_period") == month and type(usage) is int else 0.0


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.6f}"
