"""Model names to deployments: exact names, pools, and one-``*`` wildcards.

A name listed more than once in ``models:`` is a pool; this router takes turns
(round robin). Retries, fallbacks and other strategies build on :meth:`Router.pool`.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from aiproxy.config import DEFAULT_TIMEOUTS, ModelConfig
from aiproxy.errors import ProxyError
from aiproxy.upstream import to_httpx

if TYPE_CHECKING:
    from aiproxy.provider import Provider

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


@dataclass(slots=True)
class _Pattern:
    prefix: str
    suffix: str
    pool: list[Deployment] = field(default_factory=list)

    def matches(self, name: str) -> bool:
        return (len(name) > len(self.prefix) + len(self.suffix)
                and name.startswith(self.prefix) and name.endswith(self.suffix))


class Router:
    def __init__(self, models: list[ModelConfig], providers: dict[str, Provider],
                 disabled: dict[str, str]) -> None:
        """``disabled`` maps a provider left out of routing to the reason, for messages."""
        self._exact: dict[str, list[Deployment]] = {}
        self._patterns: list[_Pattern] = []
        self._unavailable: dict[str, str] = {}
        self._turns: dict[int, itertools.count[int]] = {}
        self._listed: tuple[float, list[tuple[str, str]]] | None = None
        for m in models:
            provider = providers.get(m.provider)
            if provider is None:
                reason = disabled.get(m.provider, "it is not configured")
                self._unavailable.setdefault(m.name, f"provider {m.provider!r} is unavailable: {reason}")
                continue
            deployment = Deployment(
                name=m.name, provider=provider, model=m.model,
                timeout=to_httpx(m.timeout.over(provider.config.timeout).over(DEFAULT_TIMEOUTS)),
                options={**provider.config.options, **m.options}, config=m,
            )
            if "*" in m.name:
                prefix, suffix = m.name.split("*")
                for p in self._patterns:
                    if (p.prefix, p.suffix) == (prefix, suffix):
                        p.pool.append(deployment)
                        break
                else:
                    self._patterns.append(_Pattern(prefix, suffix, [deployment]))
            else:
                self._exact.setdefault(m.name, []).append(deployment)
        for name in self._exact:
            self._unavailable.pop(name, None)

    def pool(self, model: str) -> list[Deployment]:
        """Every deployment that may serve ``model``; 404 naming it when none can."""
        pool = self._exact.get(model)
        if pool:
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

    def pick(self, model: str) -> Deployment:
        pool = self.pool(model)
        if len(pool) == 1:
            return pool[0]
        turn = self._turns.setdefault(id(pool), itertools.count())
        return pool[next(turn) % len(pool)]

    def exact_names(self) -> list[tuple[str, str]]:
        return [(name, pool[0].provider.name) for name, pool in self._exact.items()]

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
            for d in p.pool:
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
        return self.pool(model)[0].provider.name
