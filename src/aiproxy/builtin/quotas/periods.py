"""Calendar periods in UTC: a day and a month, their names and the instant they reset."""

from __future__ import annotations

import calendar
import datetime as dt
import time
from dataclasses import dataclass

DAY = 86400
#: counters outlive their period by this much, so a replica whose clock is a little
#: behind still finds the one it is adding to
GRACE = DAY


@dataclass(frozen=True, slots=True)
class Period:
    name: str  # "2026-11" or "2026-11-27"
    start: float  # epoch seconds
    end: float  # the first instant of the next period: when counters for this one reset

    @property
    def resets(self) -> str:
        return iso(self.end)


@dataclass(frozen=True, slots=True)
class Periods:
    day: Period
    month: Period


def periods_at(now: float) -> Periods:
    """The UTC day and month ``now`` (epoch seconds) falls in."""
    t = time.gmtime(now)
    day_start = float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)))
    month_start = float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    month_end = float(calendar.timegm((year, month, 1, 0, 0, 0)))
    return Periods(
        Period(f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", day_start, day_start + DAY),
        Period(f"{t.tm_year:04d}-{t.tm_mon:02d}", month_start, month_end))


class Calendar:
    """``periods_at`` remembered for the current day: the hot path asks every call."""

    def __init__(self) -> None:
        self._current = periods_at(0.0)

    def at(self, now: float) -> Periods:
        current = self._current
        if not current.day.start <= now < current.day.end:
            current = self._current = periods_at(now)
        return current


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
