"""Which deployment of a pool serves the next attempt, and which ones may serve a caller.

A strategy picks among the candidates it is given (already narrowed to the ones that
may serve this caller, that this call has not tried yet and that are not cooling down):

- ``round_robin``  takes turns;
- ``weighted``     draws by ``weight`` (an A/B split: 80/20 sends about 80% one way);
- ``least_busy``   the one with the fewest calls in flight from this process;
- ``latency``      the lowest recent latency (a moving average of successful attempts:
                   time to the whole answer, or to a stream's first event); one never
                   measured is tried first.

Ties go in turn, so equally good deployments share the load.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiproxy.call import Principal
    from aiproxy.router import Deployment

Strategy = Callable[[Sequence["Deployment"], int, random.Random], "Deployment"]


def _round_robin(candidates: Sequence[Deployment], turn: int, rng: random.Random) -> Deployment:
    return candidates[turn % len(candidates)]


def _weighted(candidates: Sequence[Deployment], turn: int, rng: random.Random) -> Deployment:
    weights = [1.0 if d.weight is None else d.weight for d in candidates]
    if not any(weights):
        return candidates[turn % len(candidates)]
    return rng.choices(candidates, weights)[0]


def _lowest(key: Callable[[Deployment], float]) -> Strategy:
    def pick(candidates: Sequence[Deployment], turn: int, rng: random.Random) -> Deployment:
        n = len(candidates)
        start = turn % n
        best = candidates[start]
        for i in range(1, n):
            d = candidates[(start + i) % n]
            if key(d) < key(best):
                best = d
        return best
    return pick


STRATEGIES: dict[str, Strategy] = {
    "round_robin": _round_robin,
    "weighted": _weighted,
    "least_busy": _lowest(lambda d: d.in_flight),
    "latency": _lowest(lambda d: d.latency if d.latency is not None else -1.0),
}


class Turns:
    """A shared turn counter (``itertools.count`` is atomic enough under one event loop)."""

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count = itertools.count()

    def next(self) -> int:
        return next(self._count)


def serves(deployment: Deployment, principal: Principal | None) -> bool:
    """Does ``deployment``'s ``route:`` rule admit this caller (tier, tenant, user)?"""
    for key, allowed in deployment.route.items():
        if principal is None:
            return False
        value = (principal.user or principal.id) if key == "user" else getattr(principal, key)
        if value not in allowed:
            return False
    return True
