"""The ``metrics:`` section, read and checked once; a bad value names its path."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

#: seconds; a gateway answers embeddings in milliseconds and long generations in minutes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                   60.0, 120.0, 300.0, 600.0)
#: seconds to a stream's first chunk: tens of ms (a cache, a small model) to a minute
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
                20.0, 30.0, 60.0)
KEYS = ("path", "require_key", "key", "latency_buckets", "ttft_buckets", "max_wildcard_models",
        "sync_interval")
_PATH = re.compile(r"(?:/[A-Za-z0-9._~-]+)+")
_RESERVED = ("/v1", "/api/ai", "/health", "/ready")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


@dataclass(slots=True, frozen=True)
class MetricsSettings:
    path: str = "/metrics"
    require_key: bool = False
    key: str | None = None  # a scrape-only bearer token (never logged)
    latency_buckets: tuple[float, ...] = LATENCY_BUCKETS
    ttft_buckets: tuple[float, ...] = TTFT_BUCKETS
    max_wildcard_models: int = 100
    sync_interval: float = 1.0

    def __repr__(self) -> str:  # keeps the key out of logs and tracebacks
        return (f"MetricsSettings(path={self.path!r}, require_key={self.require_key}, "
                f"key={'set' if self.key else None})")


def parse_settings(raw: dict[str, Any], master_key: str | None) -> MetricsSettings:
    """``metrics:`` → settings; raises ValueError naming the first bad key."""
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"metrics.{unknown[0]}: unknown setting (known: {', '.join(KEYS)})")
    path = raw.get("path", "/metrics")
    if not isinstance(path, str) or not _PATH.fullmatch(path.rstrip("/")):
        # not "//" (an empty route), "?" (a route nobody reaches), "{x}" (a route pattern)
        raise ValueError(f"metrics.path: expected a path like /metrics, got {path!r}")
    path = path.rstrip("/")
    for reserved in _RESERVED:
        if path == reserved or path.startswith(reserved + "/"):
            raise ValueError(f"metrics.path: {path!r} is under {reserved}, which the gateway serves")
    key = raw.get("key")
    if key is not None and not isinstance(key, str):
        raise ValueError("metrics.key: expected a string (use ${AIPROXY_METRICS_KEY})")
    key = key or None
    require = _boolean(raw.get("require_key"), "metrics.require_key")
    if require is None:  # default: a key when the gateway has one (it may listen beyond loopback)
        require = bool(master_key or key)
    if require and not (master_key or key):
        raise ValueError("metrics.require_key: true, but no key could be accepted: set "
                         "server.master_key or metrics.key (a scrape-only token)")
    return MetricsSettings(
        path=path, require_key=require, key=key,
        latency_buckets=_buckets(raw.get("latency_buckets"), "metrics.latency_buckets", LATENCY_BUCKETS),
        ttft_buckets=_buckets(raw.get("ttft_buckets"), "metrics.ttft_buckets", TTFT_BUCKETS),
        max_wildcard_models=int(_number(raw.get("max_wildcard_models"), "metrics.max_wildcard_models",
                                        100, integer=True)),
        sync_interval=_number(raw.get("sync_interval"), "metrics.sync_interval", 1.0, positive=True),
    )


def _boolean(value: Any, path: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError(f"{path}: expected true or false, got {value!r}")


def _number(value: Any, path: str, default: float, *, integer: bool = False,
            positive: bool = False) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (integer and number != int(number)) or number < 0 \
            or (positive and number == 0):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{path}: expected {kind} {'above' if positive else 'of at least'} 0, "
                         f"got {value!r}")
    return number


def _buckets(value: Any, path: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if value is None:
        return default
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: expected a list of upper bounds in seconds, e.g. [0.1, 1, 10]")
    bounds = tuple(_number(v, f"{path}[{i}]", 0.0, positive=True) for i, v in enumerate(value))
    if list(bounds) != sorted(set(bounds)):
        raise ValueError(f"{path}: bounds must increase, got {list(value)}")
    return bounds
