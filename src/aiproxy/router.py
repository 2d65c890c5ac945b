"""Model names to deployments: exact names, pools, and one-``*`` wildcards.

A name listed more than once in ``models:`` is a pool; its strategy picks the
deployment for each attempt. The attempts themselves — retries, fallbacks, timeouts,
cooldowns — are run by :mod:`aiproxy.routing.attempts` through :meth:`Router.whole`
and :meth:`Router.stream`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from aiproxy.config import DEFAULT_TIMEOUTS, ModelConfig, Timeouts
from aiproxy.errors import ProxyError
from aiproxy.routing import attempts
from aiproxy.routing.breaker import LocalBreaker, RedisBreaker
from aiproxy.routing.settings import PoolSettings, pool_settings
from aiproxy.routing.strategies import STRATEGIES, Turns, serves
from aiproxy.upstream import to_httpx

if TYPE_CHECKING:
    from aiproxy.call import Call, Principal
    from aiproxy.provider import Provider, Reply

log = logging.getLogger("aiproxy.router")
MODEL_LIST_TTL = 60.0


@dataclass(slots=True, eq=False)
class Deployment:
    """One way to serve a model name: a provider, an upstream model, its settings."""

    name: str
    provider: Provider
    model: str | None
    timeout: httpx.Timeout
    options: dict[str, Any]
    config: ModelConfig
    id: str = ""  # names it in headers, logs and cooldown state; never holds a secret
    weight: float | None = None
    route: dict[str, frozenset[str]] = field(default_factory=dict)
    limits: Timeouts = field(default_factory=Timeouts)  # first_token, idle, total
    in_flight: int = 0  # attempts (and, for least_busy, streams) running now, in this process
    count_streams: bool = False  # least_busy: a stream counts as in flight until it ends
    latency: float | None = None  # moving average of successful attempts, seconds

    def upstream_model(self, requested: str) -> str:
        """The model to ask the upstream for, given the name the client sent."""
        template = self.model
        if "*" not in self.name:
            return template or requested
        if not template:
            return requested
        if "*" not in template:
            return template
        prefix, suffix = self.name.split("*")
        wild = requested[len(prefix):len(requested) - len(suffix) if suffix else None]
        return template.replace("*", wild)

    def client_name(self, upstream: str) -> str | None:
        """The name a client would send to reach upstream model ``upstream`` (wildcards)."""
        template = self.model if self.model and "*" in self.model else self.name
        t_prefix, t_suffix = template.split("*")
        if not (upstream.startswith(t_prefix) and upstream.endswith(t_suffix)) \
                or len(upstream) < len(t_prefix) + len(t_suffix):
            return None
        wild = upstream[len(t_prefix):len(upstream) - len(t_suffix) if t_suffix else None]
        prefix, suffix = self.name.split("*")
        return prefix + wild + suffix


@dataclass(slots=True, eq=False)
class Pool:
    """The deployments of one model name and how they are used."""

    name: str
    deployments: list[Deployment]
    settings: PoolSettings
    turns: Turns = field(default_factory=Turns)
    #: one deployment for everyone and nowhere to fall back to: no choice to make
    simple: bool = False
    #: an A/B split (weights or caller rules), whose arm is worth recording
    split: bool = False
    routed: bool = False  # some deployment has a route: rule

    def seal(self) -> None:
        """Work out the flags above once its deployments are all in."""
        s = self.settings
        self.routed = any(d.route for d in self.deployments)
        self.simple = (len(self.deployments) == 1 and not self.routed and not s.fallbacks
                       and not s.context_window_fallbacks and not s.content_policy_fallbacks)
        self.split = s.strategy == "weighted" or self.routed
        for d in self.deployments:
            d.count_streams = s.strategy == "least_busy"

    def candidates(self, principal: Principal | None) -> list[Deployment]:
        """The deployments that may serve this caller: those whose ``route:`` admits it,
        else those without a rule; 403 when a rule excludes the caller from all."""
        if not self.routed:
            return self.deployments
        chosen = [d for d in self.deployments if d.route and serves(d, principal)]
        if not chosen:
            chosen = [d for d in self.deployments if not d.route]
        if not chosen:
            raise ProxyError(403, f"No deployment of the model '{self.name}' serves this caller.",
                             param="model", code="model_not_allowed")
        return chosen

    def choose(self, candidates: list[Deployment], rng: random.Random) -> Deployment:
        if len(candidates) == 1:
            return candidates[0]
        return STRATEGIES[self.settings.strategy](candidates, self.turns.next(), rng)


@dataclass(slots=True)
class RoutingStats:
    """Counters of what routing did, for metrics to export."""

    attempts: int = 0
    retries: int = 0  # attempts after the first within a pool
    fallbacks: int = 0  # moves to another model name
    cooldowns: int = 0  # deployments taken out
    exhausted: int = 0  # calls that got an error after more than one attempt
    served: Counter[str] = field(default_factory=Counter)  # deployment id → successful attempts
    failures: Counter[str] = field(default_factory=Counter)  # deployment id → failed attempts


def _breaker(redis_url: str | None, prefix: str, clock: Callable[[], float]) -> LocalBreaker:
    if redis_url:
        try:
            return RedisBreaker(redis_url, prefix, clock)
        except ValueError:  # a URL redis cannot use (not logged: it may hold a password)
            log.warning("routing: redis.url is not a redis:// URL; cooldown state stays in process")
    return LocalBreaker(clock)


@dataclass(slots=True)
class _Pattern:
    prefix: str
    suffix: str
    pool: Pool

    def matches(self, name: str) -> bool:
        return (len(name) > len(self.prefix) + len(self.suffix)
                and name.startswith(self.prefix) and name.endswith(self.suffix))


class Router:
    """Model names to pools, and the state attempts share: cooldowns, stats, the clock.

    ``clock`` (monotonic seconds), ``sleep`` and ``rng`` are attributes so tests can
    replace them: backoff and ``retry-after`` waits then take no real time.
    """

    def __init__(self, models: list[ModelConfig], providers: dict[str, Provider],
                 disabled: dict[str, str], *, redis_url: str | None = None,
                 redis_prefix: str = "aiproxy:") -> None:
        """``disabled`` maps a provider left out of routing to the reason, for messages."""
        self._exact: dict[str, Pool] = {}
        self._patterns: list[_Pattern] = []
        self._unavailable: dict[str, str] = {}
        self._listed: tuple[float, list[tuple[str, str]]] | None = None
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.rng = random.Random()
        self.stats = RoutingStats()
        self.breaker = _breaker(redis_url, redis_prefix, self._now)
        entries: dict[str, list[ModelConfig]] = {}
        for m in models:
            entries.setdefault(m.name, []).append(m)
        for m in models:
            provider = providers.get(m.provider)
            if provider is None:
                reason = disabled.get(m.provider, "it is not configured")
                self._unavailable.setdefault(m.name, f"provider {m.provider!r} is unavailable: {reason}")
                continue
            limits = m.timeout.over(provider.config.timeout).over(DEFAULT_TIMEOUTS)
            deployment = Deployment(
                name=m.name, provider=provider, model=m.model, timeout=to_httpx(limits),
                options={**provider.config.options, **m.options}, config=m,
                id=m.routing.id or f"{provider.name}/{m.model or m.name}#{m.index}",
                weight=m.routing.weight, route=m.routing.route, limits=limits,
            )
            pool = self._exact.get(m.name) if "*" not in m.name else next(
                (p.pool for p in self._patterns if p.pool.name == m.name), None)
            if pool is not None:
                pool.deployments.append(deployment)
                continue
            pool = Pool(m.name, [deployment], pool_settings([e.routing for e in entries[m.name]]))
            if "*" in m.name:
                prefix, suffix = m.name.split("*")
                self._patterns.append(_Pattern(prefix, suffix, pool))
            else:
                self._exact[m.name] = pool
        for name in self._exact:
            self._unavailable.pop(name, None)
        for pool in [*self._exact.values(), *(p.pool for p in self._patterns)]:
            pool.seal()

    def _now(self) -> float:
        return self.clock()

    async def aclose(self) -> None:
        await self.breaker.aclose()

    def pool(self, model: str) -> Pool:
        """The pool that serves ``model``; 404 naming it when none can."""
        pool = self._exact.get(model)
        if pool is not None:
            return pool
        for p in self._patterns:
            if p.matches(model):
                return p.pool
        reason = self._unavailable.get(model)
        if reason:
            raise ProxyError(404, f"The model '{model}' is not available: {reason}",
                             param="model", code="model_not_found")
        raise ProxyError(404, f"The model '{model}' does not exist or you do not have access to it.",
                         param="model", code="model_not_found")

    def pick(self, model: str, principal: Principal | None = None) -> Deployment:
        """The deployment for a call's first attempt (its strategy's choice; not one
        that is cooling down while another may serve)."""
        pool = self.pool(model)
        if pool.simple:
            return pool.deployments[0]
        candidates = pool.candidates(principal)
        if len(candidates) > 1:
            warm = [d for d in candidates if not self.breaker.cooling(d.id)]
            candidates = warm or candidates
        return pool.choose(candidates, self.rng)

    async def whole(self, call: Call, method: str) -> Reply:
        """Run ``provider.<method>`` for a whole answer, with retries and fallbacks."""
        return await attempts.run(self, call, method, attempts.whole)

    async def stream(self, call: Call, method: str) -> tuple[bytes | None, AsyncIterator[bytes]]:
        """Open a stream (retried and fallen back until its first event): that event,
        then the rest; idle and total timeouts end it with an error event."""
        return await attempts.run(self, call, method, attempts.stream)

    def exact_names(self) -> list[tuple[str, str]]:
        return [(name, pool.deployments[0].provider.name) for name, pool in self._exact.items()]

    async def list_models(self) -> list[tuple[str, str]]:
        """(model name, provider name) pairs: exact names, then what wildcard providers list.

        Upstream listings are cached for a minute; an upstream that fails to list is
        skipped with a warning rather than failing the whole list.
        """
        now = time.monotonic()
        if self._listed and now - self._listed[0] < MODEL_LIST_TTL:
            return self._listed[1]
        seen = dict.fromkeys(name for name, _ in self.exact_names())
        out = self.exact_names()
        for p in self._patterns:
            for d in p.pool.deployments:
                try:
                    upstream = await d.provider.list_models()
                except ProxyError as exc:
                    log.warning("listing models of provider %r failed: %s", d.provider.name, exc.message)
                    continue
                for u in upstream:
                    name = d.client_name(u)
                    if name is not None and name not in seen:
                        seen[name] = None
                        out.append((name, d.provider.name))
        self._listed = (now, out)
        return out

    def owner(self, model: str) -> str:
        return self.pool(model).deployments[0].provider.name
