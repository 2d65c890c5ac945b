"""The quotas stage's way to its shared counters in Redis: failing open or closed when
Redis is away, what calls used meanwhile owed and caught up, and every write numbered so
that one whose answer was lost is sent again and still counts once (a mixin of
:class:`~aiproxy.builtin.quotas.stage.Quotas`, which holds the state it uses)."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiproxy.builtin.quotas.counters import Add, Counters, RedisCounters, Reserve
from aiproxy.errors import ProxyError

if TYPE_CHECKING:
    from aiproxy.builtin.quotas.settings import QuotaSettings

log = logging.getLogger("aiproxy.quotas")
_DOWN = object()  # the shared counters cannot be reached and the stage fails open
MAX_OWED = 100_000  # counters whose increments wait for Redis to come back
LOG_EVERY = 60.0  # seconds between two "Redis is unreachable" errors in the log


@dataclass(frozen=True, slots=True)
class Unsure:
    """A reservation sent to Redis whose answer never came: it may or may not be taken."""

    write: int


class SharedCounters:
    """Counting in Redis, as the stage's before-call, settle and periodic tick use it."""

    settings: QuotaSettings
    counters: Counters
    _owed: dict[str, list[float]]
    _down_until: float
    _logged_at: float
    _repaying: bool
    _writes: int
    _forget: list[int]
    _unsure: dict[int, tuple[list[Add], int, list[float] | None]]
    backend_errors: int
    lost: int

    async def _reserve(self, items: list[Reserve], now: float) -> tuple[int, float] | object | None:
        if not isinstance(self.counters, RedisCounters):
            return await self.counters.reserve(items, now)
        if now < self._down_until:
            return self._unavailable(now)
        try:
            await self._repay(now)
        except Exception as exc:  # the reservation was not sent
            self._failed(exc, now)
            return self._unavailable(now)
        write = self._write()
        forget, self._forget = self._forget, []
        try:
            refused = await self.counters.reserve(items, now, write=write, forget=forget)
        except asyncio.CancelledError:  # the call is gone, and Redis may have taken it
            self._forget += forget
            self._give_back(items, write)
            raise
        except Exception as exc:  # Redis may have taken it: its write says, at settle
            self._forget += forget
            self._failed(exc, now)
            if self.settings.fail_open:
                return Unsure(write)
            self._give_back(items, write)
            return self._unavailable(now)
        self._forget.append(write)
        return refused

    def _give_back(self, items: list[Reserve], write: int) -> None:
        """Queue the giving back of a reservation that may have been taken, for a call that
        will not settle (cancelled, or refused 503): sent before the next write, it takes
        back what the reservation took if Redis took it, and voids it if not."""
        back: list[Add] = [(name, 0.0, seed, expires) for name, _, amount, seed, expires in items if amount]
        if back:
            self._unsure[self._write()] = (back, write, [-amount for _, _, amount, _, _ in items if amount])

    def _write(self) -> int:
        self._writes += 1
        return self._writes

    async def _add(self, items: list[Add], now: float, held: int = 0, alt: list[float] | None = None) -> None:
        if not isinstance(self.counters, RedisCounters):
            await self.counters.add(items, now)
            return
        if now < self._down_until:
            self._postpone(items, held, alt)
            return
        try:
            await self._repay(now)
        except Exception as exc:  # this add was not sent
            self._failed(exc, now)
            self._postpone(items, held, alt)
            return
        write = self._write()
        forget, self._forget = self._forget, []
        try:
            await self.counters.add(items, now, write=write, forget=forget, held=held, alt=alt)
        except BaseException as exc:  # maybe applied: sent again as it is, under its number
            self._forget += forget
            self._unsure[write] = (items, held, alt)
            if not isinstance(exc, Exception):
                raise
            self._failed(exc, now)
            return
        self._forget.append(write)

    def _postpone(self, items: list[Add], held: int, alt: list[float] | None) -> None:
        """An add not sent: merged into what is owed, or (naming a reservation) kept as it is."""
        if not held:
            self._owe(items)
        elif len(self._unsure) < MAX_OWED:
            self._unsure[self._write()] = (items, held, alt)
        else:
            self.lost += 1

    async def _repay(self, now: float) -> None:
        """Send the writes whose answer was lost (as they were), then what is owed (numbered)."""
        # one at a time: a write resent by two calls at once could have its number forgotten
        # (after the first answer) before the second copy arrives, and count twice
        if not (self._unsure or self._owed) or self._repaying:
            return
        assert isinstance(self.counters, RedisCounters)
        self._repaying = True
        sent = 0
        try:
            while self._unsure or self._owed:
                if not self._unsure:  # what is owed, frozen as one numbered write
                    owed, self._owed = self._owed, {}
                    self._unsure[self._write()] = (
                        [(name, amount, seed, expires) for name, (amount, seed, expires) in owed.items()],
                        0, None)
                for write, (items, held, alt) in list(self._unsure.items()):
                    forget, self._forget = self._forget, []
                    try:
                        await self.counters.add(items, now, write=write, forget=forget, held=held, alt=alt)
                    except BaseException:
                        self._forget += forget
                        raise
                    self._unsure.pop(write, None)
                    self._forget.append(write)
                    sent += len(items)
        finally:
            self._repaying = False
        log.info("quotas: Redis is back; %d counter increment(s) caught up", sent)

    def _owe(self, items: list[Add]) -> None:
        for name, amount, seed, expires in items:
            entry = self._owed.get(name)
            if entry is not None:
                entry[0] += amount
            elif len(self._owed) < MAX_OWED:
                self._owed[name] = [amount, seed, expires]
            else:
                self.lost += 1

    def _failed(self, exc: BaseException, now: float) -> None:
        self.backend_errors += 1
        self._down_until = now + self.settings.retry_seconds
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.error("quotas: Redis is unreachable (%s); calls are %s for %gs, then it is tried again",
                      type(exc).__name__, "let through unchecked" if self.settings.fail_open
                      else "refused with 503", self.settings.retry_seconds)

    def _unavailable(self, now: float) -> object:
        if self.settings.fail_open:
            return _DOWN
        wait = max(1, math.ceil(self._down_until - now))
        raise ProxyError(503, "Quotas and budgets cannot be checked right now (their store is "
                         f"unreachable); retry after {wait} seconds.", type="service_unavailable",
                         code="quota_store_unavailable", headers={"retry-after": str(wait)})
