"""The ``cache:`` section, read and checked once at start-up; every mistake named by its path."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any

from aiproxy.config import Config, ConfigError

DAY = 86_400
#: built-in TTLs per operation, seconds. ``chat`` is ``ttl_seconds`` (AI_CACHE_TTL) when set.
DEFAULT_TTL = {"chat": 3600.0, "completion": 7 * DAY, "embedding": 30 * DAY, "image": 90 * DAY}
_KEYS = ("enabled", "backend", "ttl_seconds", "ttl", "max_size", "max_bytes", "max_entry_bytes",
         "max_ttl_seconds", "models", "redis_retry_seconds", "single_flight", "single_flight_wait")
_MODEL_KEYS = ("sampled", "ttl_seconds")
_BOOLS = {True: True, False: False, "true": True, "false": False, "yes": True, "no": False,
          "on": True, "off": False, "1": True, "0": False}
_MEMO_LIMIT = 4096


@dataclass(slots=True, frozen=True)
class ModelRule:
    """What ``cache.models`` says about one client model name."""

    sampled: bool = False  # cache calls that are not deterministic (temperature > 0 or unset)
    ttl: float | None = None  # this model's TTL for every operation, instead of the per-operation one


@dataclass(slots=True)
class CacheSettings:
    enabled: bool = True
    backend: str = "auto"  # auto: Redis when redis.url is set, else in process
    ttl: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TTL))
    max_size: int = 1000
    max_bytes: int = 128 * 1024 * 1024
    max_entry_bytes: int = 4 * 1024 * 1024
    max_ttl: float = 90.0 * DAY  # the most an x-aiproxy-cache-ttl header may ask for
    redis_retry: float = 5.0  # after a Redis failure, seconds before it is tried again
    # identical misses in flight at once share one upstream call (per process); the others
    # wait for its answer at most this long (and no longer than their own timeouts)
    single_flight: bool = True
    single_flight_wait: float = 60.0
    models: list[tuple[str, ModelRule]] = field(default_factory=list)  # patterns, file order
    _memo: dict[str, ModelRule] = field(default_factory=dict)

    def rule(self, model: str) -> ModelRule:
        """The rule for a client model name: the first ``cache.models`` pattern matching it."""
        found = self._memo.get(model)
        if found is None:
            found = next((rule for pattern, rule in self.models if fnmatch.fnmatchcase(model, pattern)),
                         _NO_RULE)
            if len(self._memo) >= _MEMO_LIMIT:  # wildcard models let clients send any name
                self._memo.clear()
            self._memo[model] = found
        return found


_NO_RULE = ModelRule()


def parse_settings(config: Config) -> CacheSettings:
    """``config``'s ``cache:`` section; raises ConfigError listing every problem."""
    raw = config.section("cache")
    errors: list[str] = []
    out = CacheSettings()
    for key in raw:
        if key not in _KEYS:
            errors.append(f"cache.{key}: unknown setting (known: {', '.join(_KEYS)})")
    out.enabled = _bool(raw.get("enabled", True), "cache.enabled", errors)
    backend = str(raw.get("backend") or "auto")
    if backend not in ("auto", "memory", "redis"):
        errors.append(f"cache.backend: expected auto, memory or redis, got {backend!r}")
    elif backend == "redis" and not config.redis_url:
        errors.append("cache.backend: redis needs redis.url to be set")
    out.backend = backend
    chat = _number(raw.get("ttl_seconds"), "cache.ttl_seconds", errors)
    if chat is not None:
        out.ttl["chat"] = chat
    per_op = raw.get("ttl")
    if per_op is not None and not isinstance(per_op, dict):
        errors.append("cache.ttl: expected a mapping of operation to seconds (chat, completion, "
                      "embedding, image)")
    for op, value in (per_op or {}).items() if isinstance(per_op, dict) else ():
        if op not in DEFAULT_TTL:
            errors.append(f"cache.ttl.{op}: unknown operation (known: {', '.join(DEFAULT_TTL)})")
            continue
        seconds = _number(value, f"cache.ttl.{op}", errors)
        if seconds is not None:
            out.ttl[op] = seconds
    out.max_size = _count(raw.get("max_size"), "cache.max_size", errors, out.max_size)
    out.max_bytes = _count(raw.get("max_bytes"), "cache.max_bytes", errors, out.max_bytes)
    out.max_entry_bytes = _count(raw.get("max_entry_bytes"), "cache.max_entry_bytes", errors,
                                 out.max_entry_bytes)
    max_ttl = _number(raw.get("max_ttl_seconds"), "cache.max_ttl_seconds", errors)
    if max_ttl is not None:
        out.max_ttl = max_ttl
    retry = _number(raw.get("redis_retry_seconds"), "cache.redis_retry_seconds", errors, allow_zero=True)
    if retry is not None:
        out.redis_retry = retry
    out.single_flight = _bool(raw.get("single_flight", True), "cache.single_flight", errors)
    wait = _number(raw.get("single_flight_wait"), "cache.single_flight_wait", errors)
    if wait is not None:
        out.single_flight_wait = wait
    out.models = _models(raw.get("models"), errors)
    if errors:
        raise ConfigError(errors, config.source)
    return out


def _models(raw: Any, errors: list[str]) -> list[tuple[str, ModelRule]]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        errors.append("cache.models: expected a mapping of model name (or pattern with *) to "
                      "{sampled: true, ttl_seconds: N}")
        return []
    out = []
    for pattern, spec in raw.items():
        path = f"cache.models.{pattern}"
        if not isinstance(spec, dict):
            errors.append(f"{path}: expected a mapping like {{sampled: true}}")
            continue
        for key in spec:
            if key not in _MODEL_KEYS:
                errors.append(f"{path}.{key}: unknown setting (known: {', '.join(_MODEL_KEYS)})")
        out.append((str(pattern), ModelRule(
            sampled=_bool(spec.get("sampled", False), f"{path}.sampled", errors),
            ttl=_number(spec.get("ttl_seconds"), f"{path}.ttl_seconds", errors))))
    return out


def _bool(value: Any, path: str, errors: list[str]) -> bool:
    key = value.strip().lower() if isinstance(value, str) else value
    try:
        return _BOOLS[key]
    except (KeyError, TypeError):
        errors.append(f"{path}: expected true or false, got {value!r}")
        return False


_NUMBER = re.compile(r"\s*\d+(\.\d+)?\s*")


def _number(value: Any, path: str, errors: list[str], *, allow_zero: bool = False) -> float | None:
    """A positive number of seconds (a string from ``${VAR}`` too); None when unset."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not (isinstance(value, int | float)
                                       or (isinstance(value, str) and _NUMBER.fullmatch(value))):
        errors.append(f"{path}: expected a number of seconds, got {value!r}")
        return None
    number = float(value)
    if not math.isfinite(number):  # YAML's .inf / .nan: Redis cannot take an infinite PX
        errors.append(f"{path}: expected a finite number of seconds, got {value!r}")
        return None
    if number <= 0 and not (allow_zero and number == 0):
        errors.append(f"{path}: must be more than 0, got {value!r}")
        return None
    return number


def _count(value: Any, path: str, errors: list[str], default: int) -> int:
    if value is None or value == "":
        return default
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, bool) or not (isinstance(text, int) or (isinstance(text, str) and text.isdigit())):
        errors.append(f"{path}: expected a whole number, got {value!r}")
        return default
    if int(text) < 1:
        errors.append(f"{path}: must be at least 1, got {value!r}")
        return default
    return int(text)
