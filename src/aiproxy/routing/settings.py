"""The routing knobs of a ``models:`` entry, read and checked with their paths.

Some knobs belong to one deployment (``id``, ``weight``, ``route``); the others to
the model name, i.e. the whole pool (``strategy``, ``retries``, ``deadline``,
``backoff``, ``fallbacks``, ``context_window_fallbacks``, ``content_policy_fallbacks``,
``cooldown``). A pool knob may be written on any entry of the pool, but two entries
that disagree about one are an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiproxy.config import ModelConfig, _Validator

STRATEGIES = ("round_robin", "weighted", "least_busy", "latency")
ROUTE_KEYS = ("tier", "tenant", "user")
POOL_KEYS = ("strategy", "retries", "deadline", "backoff", "fallbacks", "context_window_fallbacks",
             "content_policy_fallbacks", "cooldown")
ENTRY_KEYS = ("id", "weight", "route")
KEYS = ENTRY_KEYS + POOL_KEYS


@dataclass(slots=True, frozen=True)
class Cooldown:
    """``failures`` retryable failures within ``window`` s take a deployment out for ``duration`` s."""

    failures: int = 5
    window: float = 60.0
    duration: float = 30.0


@dataclass(slots=True)
class PoolSettings:
    """How one model name is served: the merged pool knobs of its entries."""

    strategy: str = "round_robin"
    retries: int | None = None  # attempts after the first in this pool; None: one per other deployment
    deadline: float = 60.0  # seconds from arrival after which no new attempt starts
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    cooldown: Cooldown | None = field(default_factory=Cooldown)  # None: never cooled down


@dataclass(slots=True)
class RouteSettings:
    """The routing knobs one ``models:`` entry wrote."""

    id: str | None = None
    weight: float | None = None
    route: dict[str, frozenset[str]] = field(default_factory=dict)  # tier/tenant/user → allowed
    pool: dict[str, Any] = field(default_factory=dict)  # the pool knobs it set, parsed


def parse_routing(v: _Validator, data: dict[str, Any], path: str) -> RouteSettings:
    out = RouteSettings(id=v.string(data.get("id"), f"{path}.id"),
                        weight=v.number(data.get("weight"), f"{path}.weight", float, minimum=0))
    route = v.mapping(data.get("route"), f"{path}.route")
    v.only(route, f"{path}.route", ROUTE_KEYS)
    for key in ROUTE_KEYS:
        if key in route:
            out.route[key] = frozenset(v.strings(route[key], f"{path}.route.{key}"))
    pool = out.pool
    if data.get("strategy") is not None:
        strategy = v.string(data["strategy"], f"{path}.strategy")
        if strategy not in STRATEGIES:
            v.err(f"{path}.strategy", f"expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
        else:
            pool["strategy"] = strategy
    if data.get("retries") is not None:
        pool["retries"] = v.number(data["retries"], f"{path}.retries", int, minimum=0, default=0)
    if data.get("deadline") is not None:
        pool["deadline"] = v.number(data["deadline"], f"{path}.deadline", float, minimum=0.001,
                                    default=60.0)
    if data.get("backoff") is not None:
        backoff = v.mapping(data["backoff"], f"{path}.backoff")
        v.only(backoff, f"{path}.backoff", ("base", "max"))
        for key in ("base", "max"):
            if backoff.get(key) is not None:
                pool[f"backoff_{key}"] = v.number(backoff[key], f"{path}.backoff.{key}", float,
                                                  minimum=0, default=0.0)
    for key in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
        if data.get(key) is not None:
            pool[key] = tuple(v.strings(data[key], f"{path}.{key}"))
    if "cooldown" in data:
        pool["cooldown"] = _cooldown(v, data["cooldown"], f"{path}.cooldown")
    return out


def _cooldown(v: _Validator, raw: Any, path: str) -> Cooldown | None:
    if raw is False or raw is None:
        return None
    data = v.mapping(raw, path)
    v.only(data, path, ("failures", "window", "duration"))
    d = Cooldown()
    return Cooldown(
        failures=v.number(data.get("failures"), f"{path}.failures", int, minimum=1, default=d.failures),
        window=v.number(data.get("window"), f"{path}.window", float, minimum=0.001, default=d.window),
        duration=v.number(data.get("duration"), f"{path}.duration", float, minimum=0.001,
                          default=d.duration),
    )


def pool_settings(entries: list[RouteSettings]) -> PoolSettings:
    """The pool knobs of one model name, from its entries (first one to set a knob wins)."""
    merged: dict[str, Any] = {}
    for entry in entries:
        for key, value in entry.pool.items():
            merged.setdefault(key, value)
    if "strategy" not in merged and any(e.weight is not None for e in entries):
        merged["strategy"] = "weighted"
    return PoolSettings(**merged)


def check_models(v: _Validator, models: list[ModelConfig]) -> None:
    """What no single entry shows: pool knobs that disagree, fallbacks to nowhere, ids twice."""
    first: dict[str, dict[str, tuple[int, Any]]] = {}
    ids: dict[str, int] = {}
    names = {m.name for m in models if m.name}
    patterns = [m.name.split("*") for m in models if "*" in m.name]
    for m in models:
        path = f"models[{m.index}]"
        seen = first.setdefault(m.name, {})
        for key, value in m.routing.pool.items():
            if key not in seen:
                seen[key] = (m.index, value)
            elif seen[key][1] != value:
                v.err(f"{path}.{key.split('_')[0] if key.startswith('backoff') else key}",
                      f"differs from models[{seen[key][0]}] of the same pool {m.name!r}; "
                      f"pool settings must agree (or be written once)")
        if m.routing.id is not None:
            if m.routing.id in ids:
                v.err(f"{path}.id", f"{m.routing.id!r} is already the id of models[{ids[m.routing.id]}]")
            ids.setdefault(m.routing.id, m.index)
        for key in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            for i, target in enumerate(m.routing.pool.get(key, ())):
                where = f"{path}.{key}[{i}]"
                if target == m.name:
                    v.err(where, f"a model cannot fall back to itself ({target!r})")
                elif target not in names and not any(
                        target.startswith(pre) and target.endswith(suf) and len(target) > len(pre) + len(suf)
                        for pre, suf in patterns):
                    v.err(where, f"no model named {target!r} in models:")
