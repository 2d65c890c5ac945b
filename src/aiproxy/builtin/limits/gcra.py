"""GCRA (the generic cell rate algorithm) with a cost, in process; and the answer's headers.

A limit of ``limit`` units per ``window`` seconds has an emission interval
``T = window / limit``. Its whole state is one number, the theoretical arrival time
``tat``. Taking ``n`` units at ``now``::

    tat' = max(tat, now) + n * T        admitted iff tat' - now <= window

so a full bucket lets ``limit`` through at once, and capacity then comes back one unit
every ``T`` seconds: a sliding window, never twice the limit across a boundary as
fixed windows allow. Settling a reservation later adds ``delta * T`` (negative: a
refund) to the counter, or, when it is back to full and forgotten meanwhile (a call that
outlasted its reservation), to the ``tat`` the call's own take left: the units it used
are dated from its start either way. One call's limits (key, user, tenant, model;
requests and tokens) are taken all or nothing: if any refuses, none is charged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]
EPSILON = 1e-6  # seconds: float slack, so exactly `limit` units fit in one window


class Rule:
    """One limit one call touches (a plain slotted class: built per call, so kept cheap)."""

    __slots__ = ("cost", "key", "kind", "label", "limit", "period", "window")

    def __init__(self, key: str, kind: str, limit: int, window: float, cost: int, label: str) -> None:
        self.key = key  # the counter: "<prefix>limits:key:<id>:r"
        self.kind = kind  # "requests" or "tokens"
        self.limit = limit  # units per window
        self.window = window  # seconds
        self.cost = cost  # units this call takes
        self.label = label  # who, for messages: "key 'k1' (tier free)"
        self.period = window / limit  # the emission interval T

    def __repr__(self) -> str:
        return f"Rule({self.key!r}, {self.kind}, {self.limit}/{self.window:g}s, cost={self.cost})"


@dataclass(slots=True)
class Verdict:
    """The outcome of a take: ``ahead[i]`` is ``tat - now`` of rule ``i`` (after the take
    if admitted, as it stands if refused); ``wait`` the seconds until it would be admitted;
    ``at`` the store's ``now`` (Redis's clock for Redis), so ``at + ahead[i]`` is the tat."""

    admitted: bool
    ahead: list[float]
    failed: int = -1  # the rule that refused (the one needing the longest wait)
    wait: float = 0.0
    at: float = 0.0


class LocalStore:
    """GCRA state in this process: counter → tat. Atomic because the event loop is."""

    def __init__(self, clock: Clock = time.monotonic, sweep_at: int = 100_000) -> None:
        self.clock = clock
        self.tats: dict[str, float] = {}
        self._base_sweep = self._sweep_at = sweep_at

    def take(self, rules: Sequence[Rule]) -> Verdict:
        now = self.clock()
        tats = self.tats
        before = []
        failed, wait = -1, 0.0
        for i, rule in enumerate(rules):
            tat = tats.get(rule.key, now)
            if tat < now:
                tat = now
            before.append(tat)
            over = tat + rule.cost * rule.period - now - rule.window
            if over > EPSILON and over > wait:
                failed, wait = i, over
        if failed >= 0:
            return Verdict(False, [b - now for b in before], failed, wait, now)
        after = []
        for rule, tat in zip(rules, before, strict=True):
            tat += rule.cost * rule.period
            tats[rule.key] = tat
            after.append(tat - now)
        if len(tats) > self._sweep_at:
            self._sweep(now)
        return Verdict(True, after, at=now)

    def settle(self, rules: Sequence[Rule], delta: int, taken: Sequence[float]) -> None:
        """Add ``delta`` units to each rule's counter (negative: give them back); ``taken[i]``
        is the tat rule ``i``'s take left, for a counter swept meanwhile."""
        for rule, mine in zip(rules, taken, strict=True):
            tat = self.tats.get(rule.key)
            if tat is None:
                if delta <= 0:
                    continue
                tat = mine
            self.tats[rule.key] = tat + delta * rule.period

    def _sweep(self, now: float) -> None:
        """Forget counters that are back to full (tat in the past): they hold nothing."""
        for key in [k for k, tat in self.tats.items() if tat <= now]:
            del self.tats[key]
        self._sweep_at = max(self._base_sweep, 2 * len(self.tats))


def remaining(rule: Rule, ahead: float) -> int:
    """Units that could be taken now, given ``tat - now``."""
    return max(0, math.floor((rule.window - ahead) / rule.period + EPSILON))


def duration(seconds: float) -> str:
    """A duration as OpenAI's headers write it: "120ms", "1s", "1.5s", "6m0s", "1h0m0s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def headers(rules: Sequence[Rule], ahead: Sequence[float]) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` of the tightest limit of
    each kind: the one with the fewest units left (on a tie, the one resetting last)."""
    best: dict[str, tuple[int, float, Rule]] = {}
    for rule, left in zip(rules, ahead, strict=True):
        room = remaining(rule, left)
        seen = best.get(rule.kind)
        if seen is None or room < seen[0] or (room == seen[0] and left > seen[1]):
            best[rule.kind] = (room, left, rule)
    out = {}
    for kind, (room, left, rule) in best.items():
        out[_NAMES[kind][0]] = str(rule.limit)
        out[_NAMES[kind][1]] = str(room)
        out[_NAMES[kind][2]] = duration(left)
    return out


_NAMES = {kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
          for kind in ("requests", "tokens")}
