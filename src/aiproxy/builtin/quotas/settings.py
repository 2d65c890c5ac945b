"""The ``quotas:`` config section, validated at start-up; every error names its path."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from aiproxy.config import ConfigError
from aiproxy.storage.names import TIERS

SCOPES = ("key", "user", "tenant")
_TOP = ("flush_interval", "on_backend_error", "redis_retry_seconds", "completion_estimate",
        "plans", "budgets")
_BUDGET_SECTIONS = {"tiers": None, "keys": "key", "users": "user", "tenants": "tenant"}
_CAPS = ("daily_usd", "monthly_usd")


@dataclass(frozen=True, slots=True)
class Caps:
    """Spend caps in USD; None: no cap for that period."""

    daily: float | None = None
    monthly: float | None = None

    def over(self, base: Caps | None) -> Caps:
        """These caps, with the ones left unset taken from ``base``."""
        if base is None:
            return self
        return Caps(self.daily if self.daily is not None else base.daily,
                    self.monthly if self.monthly is not None else base.monthly)


@dataclass(frozen=True, slots=True)
class Plan:
    """A tier's monthly token allowance, shared by everyone in ``per`` (key, user or tenant)."""

    monthly_tokens: int
    per: str = "tenant"


@dataclass(slots=True)
class QuotaSettings:
    flush_interval: float = 30.0
    fail_open: bool = True
    retry_seconds: float = 5.0
    completion_estimate: int = 0
    plans: dict[str, Plan] = field(default_factory=dict)
    tier_budgets: dict[str, dict[str, Caps]] = field(default_factory=dict)  # tier → scope → caps
    budgets: dict[str, dict[str, Caps]] = field(default_factory=dict)  # scope → id → caps

    @property
    def has_budgets(self) -> bool:
        return any(self.tier_budgets.values()) or any(self.budgets.values())


def parse(raw: Any, source: str = "config") -> QuotaSettings:
    """Read the section; raise ConfigError listing every problem with its path."""
    errors: list[str] = []
    out = QuotaSettings()
    section = _mapping(raw, "quotas", errors)  # a list or a word here meant no quotas at all
    _unknown(section, _TOP, "quotas", errors)
    out.flush_interval = _number(section.get("flush_interval", 30), "quotas.flush_interval", errors)
    out.retry_seconds = _number(section.get("redis_retry_seconds", 5), "quotas.redis_retry_seconds",
                                errors)
    failure = section.get("on_backend_error", "open")
    if failure not in ("open", "closed"):
        errors.append(f"quotas.on_backend_error: expected 'open' or 'closed', got {failure!r}")
    out.fail_open = failure != "closed"
    out.completion_estimate = int(_number(section.get("completion_estimate", 0),
                                          "quotas.completion_estimate", errors, whole=True))
    plans = _mapping(section.get("plans"), "quotas.plans", errors)
    for tier, value in plans.items():
        path = f"quotas.plans.{tier}"
        _tier(tier, path, errors)
        entry = _mapping(value, path, errors)
        _unknown(entry, ("monthly_tokens", "per"), path, errors)
        if "monthly_tokens" not in entry:
            errors.append(f"{path}.monthly_tokens: required (a whole number of tokens a month)")
            continue
        tokens = int(_number(entry["monthly_tokens"], f"{path}.monthly_tokens", errors, whole=True))
        per = entry.get("per", "tenant")
        if per not in SCOPES:
            errors.append(f"{path}.per: expected one of {', '.join(SCOPES)}, got {per!r}")
            per = "tenant"
        out.plans[str(tier)] = Plan(tokens, per)
    budgets = _mapping(section.get("budgets"), "quotas.budgets", errors)
    _unknown(budgets, tuple(_BUDGET_SECTIONS), "quotas.budgets", errors)
    for tier, value in _mapping(budgets.get("tiers"), "quotas.budgets.tiers", errors).items():
        path = f"quotas.budgets.tiers.{tier}"
        _tier(tier, path, errors)
        scopes = _mapping(value, path, errors)
        _unknown(scopes, SCOPES, path, errors)
        out.tier_budgets[str(tier)] = {scope: _caps(scopes[scope], f"{path}.{scope}", errors)
                                       for scope in SCOPES if scope in scopes}
    for name, scope in _BUDGET_SECTIONS.items():
        if scope is None:
            continue
        path = f"quotas.budgets.{name}"
        out.budgets[scope] = {str(ident): _caps(value, f"{path}.{ident}", errors)
                              for ident, value in _mapping(budgets.get(name), path, errors).items()}
    if errors:
        raise ConfigError(errors, source)
    return out


def _caps(value: Any, path: str, errors: list[str]) -> Caps:
    entry = _mapping(value, path, errors)
    _unknown(entry, _CAPS, path, errors)
    daily = entry.get("daily_usd")
    monthly = entry.get("monthly_usd")
    return Caps(None if daily is None else _number(daily, f"{path}.daily_usd", errors),
                None if monthly is None else _number(monthly, f"{path}.monthly_usd", errors))


def _mapping(value: Any, path: str, errors: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
        return {}
    return value


def _unknown(entry: dict[str, Any], allowed: tuple[str, ...], path: str, errors: list[str]) -> None:
    for name in entry:
        if name not in allowed:
            near = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (expected {', '.join(allowed)})"
            errors.append(f"{path}.{name}: unknown setting{hint}")


def _tier(tier: Any, path: str, errors: list[str]) -> None:
    if tier not in TIERS:
        errors.append(f"{path}: no tier {tier!r} (tiers are {', '.join(TIERS)})")


def _number(value: Any, path: str, errors: list[str], *, whole: bool = False) -> float:
    """A non-negative number (numeric strings too: ``${VAR:-10}`` expands to one)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        kind = "a whole number" if whole else "a number"
        errors.append(f"{path}: expected {kind}, got {value!r}")
        return 0.0
    if not math.isfinite(number) or number < 0:
        errors.append(f"{path}: must be a finite number of at least 0, got {value!r}")
        return 0.0
    if whole and number != int(number):
        errors.append(f"{path}: expected a whole number, got {value!r}")
        return 0.0
    return number
