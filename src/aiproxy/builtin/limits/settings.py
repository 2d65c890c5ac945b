"""The ``limits:`` section: read, check, and report every mistake with its path.

    limits:
      window_seconds: 3600          # the default window of every tier's request limit
      tiers:
        free: {requests: 10}        # 10 requests per window, per key (and per user, tenant)
        pro: {requests: 1000, tokens_per_minute: 200000}
      models:                       # the model as a whole, whoever calls it
        gpt-4o:
          requests: 500
          window_seconds: 60
          tokens_per_minute: 30000
          tiers:                    # and each key of a tier, on this model only
            free: {requests: 2}
      scopes: [key, user, tenant]   # which counters a tier's limits apply to
      default_tier: free            # a key that names no tier
      anonymous_tier: null          # callers with no key (keys not required): not limited
      completion_estimate: 256      # output tokens reserved when a request sets no max_tokens
      on_backend_error: open        # Redis unreachable: open (admit) or closed (503)
      backend_retry_seconds: 1      # after a Redis failure, try it again after this long
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from aiproxy.config import ConfigError

SCOPES = ("key", "user", "tenant")
KEYS = ("window_seconds", "tiers", "models", "scopes", "default_tier", "anonymous_tier",
        "completion_estimate", "on_backend_error", "backend_retry_seconds")
RATE_KEYS = ("requests", "window_seconds", "tokens_per_minute")
MODEL_KEYS = (*RATE_KEYS, "tiers")
#: the key of a virtual key's metadata that overrides its tier's limits (key scope only)
OVERRIDE = "rate_limits"


@dataclass(frozen=True, slots=True)
class Rate:
    """One set of limits: requests per window and tokens per minute; None is no limit."""

    requests: int | None = None
    window: float = 60.0
    tokens_per_minute: int | None = None

    def over(self, base: Rate) -> Rate:
        return Rate(self.requests if self.requests is not None else base.requests, self.window,
                    self.tokens_per_minute if self.tokens_per_minute is not None
                    else base.tokens_per_minute)


@dataclass(slots=True)
class LimitSettings:
    tiers: dict[str, Rate] = field(default_factory=dict)
    models: dict[str, Rate] = field(default_factory=dict)  # the model as a whole
    model_tiers: dict[str, dict[str, Rate]] = field(default_factory=dict)  # model → tier → per key
    scopes: tuple[str, ...] = SCOPES
    default_tier: str | None = "free"
    anonymous_tier: str | None = None
    completion_estimate: int = 256
    fail_open: bool = True
    backend_retry: float = 1.0
    window: float = 3600.0

    @property
    def active(self) -> bool:
        """Does anything limit anyone? (If not, the stage costs nothing per call.)"""
        return bool(self.tiers or self.models or self.model_tiers)


class _Reader:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def whole(self, value: Any, path: str, *, minimum: int = 1) -> int | None:
        if value is None or value == "":
            return None
        number = _number(value)
        if number is None or number != int(number) or number < minimum:
            self.errors.append(f"{path}: expected a whole number ≥ {minimum}, got {value!r}")
            return None
        return int(number)

    def seconds(self, value: Any, path: str, default: float) -> float:
        if value is None or value == "":
            return default
        number = _number(value)
        if number is None or number <= 0:
            self.errors.append(f"{path}: expected a number of seconds > 0, got {value!r}")
            return default
        return number

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return {}
        return value

    def only(self, data: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                self.errors.append(f"{path}.{key}: unknown setting (expected one of: {', '.join(allowed)})")

    def rate(self, value: Any, path: str, window: float, allowed: tuple[str, ...] = RATE_KEYS) -> Rate:
        data = self.mapping(value, path)
        self.only(data, path, allowed)
        return Rate(self.whole(data.get("requests"), f"{path}.requests"),
                    self.seconds(data.get("window_seconds"), f"{path}.window_seconds", window),
                    self.whole(data.get("tokens_per_minute"), f"{path}.tokens_per_minute"))

    def name(self, value: Any, path: str, choices: dict[str, Rate]) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or value not in choices:
            known = ", ".join(choices) or "none are configured"
            self.errors.append(f"{path}: expected the name of a tier in limits.tiers ({known}), "
                               f"got {value!r}")
            return None
        return value


def _number(value: Any) -> float | None:
    """A finite number (numeric strings too: ``${VAR:-10}`` expands to one), else None.
    NaN and infinity are refused: a NaN window compares false and would admit everything."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value.strip()) if isinstance(value, str) else \
            float(value) if isinstance(value, int | float) else None
    except (ValueError, OverflowError):  # OverflowError: an int past float's range
        return None
    return number if number is not None and math.isfinite(number) else None


def parse_settings(raw: Any, source: str = "config") -> LimitSettings:
    """``limits:`` → LimitSettings. Raises ConfigError listing every problem with its path."""
    r = _Reader()
    data = r.mapping(raw, "limits")
    r.only(data, "limits", KEYS)
    window = r.seconds(data.get("window_seconds"), "limits.window_seconds", 3600.0)
    tiers = {str(name): r.rate(value, f"limits.tiers.{name}", window)
             for name, value in r.mapping(data.get("tiers"), "limits.tiers").items()}
    models: dict[str, Rate] = {}
    model_tiers: dict[str, dict[str, Rate]] = {}
    for name, value in r.mapping(data.get("models"), "limits.models").items():
        path = f"limits.models.{name}"
        whole = r.rate(value, path, 60.0, MODEL_KEYS)
        if whole.requests or whole.tokens_per_minute:
            models[str(name)] = whole
        rows = r.mapping(value.get("tiers") if isinstance(value, dict) else None, f"{path}.tiers")
        for tier, row in rows.items():
            if tier not in tiers:
                r.errors.append(f"{path}.tiers.{tier}: no tier {tier!r} in limits.tiers "
                                f"({', '.join(tiers) or 'none are configured'})")
                continue
            model_tiers.setdefault(str(name), {})[str(tier)] = r.rate(row, f"{path}.tiers.{tier}", window)
    scopes = data.get("scopes", list(SCOPES))
    if isinstance(scopes, str):
        scopes = [scopes]
    if not isinstance(scopes, list) or any(s not in SCOPES for s in scopes):
        r.errors.append(f"limits.scopes: expected a list of {', '.join(SCOPES)}, got {scopes!r}")
        scopes = list(SCOPES)
    mode = str(data.get("on_backend_error") or "open").lower()
    if mode not in ("open", "closed"):
        r.errors.append(f"limits.on_backend_error: expected open or closed, got {data['on_backend_error']!r}")
    default_tier = data.get("default_tier", "free" if "free" in tiers else None)
    settings = LimitSettings(
        tiers=tiers, models=models, model_tiers=model_tiers, scopes=tuple(dict.fromkeys(scopes)),
        default_tier=r.name(default_tier, "limits.default_tier", tiers),
        anonymous_tier=r.name(data.get("anonymous_tier"), "limits.anonymous_tier", tiers),
        completion_estimate=_or(r.whole(data.get("completion_estimate"), "limits.completion_estimate",
                                        minimum=0), 256),
        fail_open=mode != "closed",
        backend_retry=r.seconds(data.get("backend_retry_seconds"), "limits.backend_retry_seconds", 1.0),
        window=window,
    )
    if r.errors:
        raise ConfigError(r.errors, source)
    return settings


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def key_override(metadata: dict[str, Any], base: Rate | None, window: float) -> Rate | None:
    """A key's own limits (``metadata.rate_limits``) over its tier's; None when neither limits.

    Written by whoever manages the key (an admin: ``PATCH /api/ai/keys/{id}``, or
    ``metadata:`` of a declared key). A malformed value is ignored (the tier's limits
    stay), never a failed call.
    """
    data = metadata.get(OVERRIDE)
    if not isinstance(data, dict):
        return base
    r = _Reader()
    base = base or Rate(window=window)
    mine = Rate(r.whole(data.get("requests"), "requests"),
                r.seconds(data.get("window_seconds"), "window_seconds", base.window),
                r.whole(data.get("tokens_per_minute"), "tokens_per_minute"))
    if r.errors:
        return base if base.requests or base.tokens_per_minute else None
    return mine.over(base)
