"""Checking management request bodies and query strings: a 400 naming the field.

Durations (``expires_in``, ``grace``, the CLI's ``--expires-in``) are seconds as a
number, or a number with a unit: ``90s``, ``15m``, ``12h``, ``30d``, ``2w``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any

from aiproxy.errors import ProxyError
from aiproxy.storage.names import ROLES, TIERS
from aiproxy.storage.pages import MAX_LIMIT

_DURATION = re.compile(r"^\s*([0-9]{1,12})\s*([smhdw]?)\s*$")  # bounded: int() of 5000 digits raises
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_SECONDS = 100 * 365 * 86400
DEFAULT_LIMIT = 50


def bad(param: str, message: str) -> ProxyError:
    return ProxyError(400, f"{param}: {message}", param=param, code="invalid_value")


def parse_duration(value: object, param: str) -> dt.timedelta:
    """Seconds (a non-negative int) or ``<n><s|m|h|d|w>``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise bad(param, f"expected seconds or a duration such as '30d', got {_kind(value)}")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.match(value)
        if not match:
            raise bad(param, f"expected seconds or a duration such as '30d', got {value!r}")
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if not 0 <= seconds <= MAX_SECONDS:
        raise bad(param, "must be between 0 and 100 years")
    return dt.timedelta(seconds=seconds)


def parse_instant(value: object, param: str) -> dt.datetime:
    """An ISO-8601 date-time with a timezone (``2027-01-31T00:00:00Z``)."""
    if not isinstance(value, str):
        raise bad(param, f"expected an ISO-8601 date-time, got {_kind(value)}")
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise bad(param, f"expected an ISO-8601 date-time such as 2027-01-31T00:00:00Z, "
                         f"got {value!r}") from None
    if when.tzinfo is None:
        raise bad(param, "needs a timezone (end it with Z for UTC)")
    try:
        return when.astimezone(dt.UTC)
    except OverflowError:  # 9999-12-31T23:59-01:00 is in year 10000 in UTC
        raise bad(param, f"is out of range: {value!r}") from None


def model_allowed(name: str, configured: Iterable[str]) -> bool:
    """Whether a client may ask for ``name`` under the configured model names (``a/*``)."""
    for pattern in configured:
        if "*" in pattern:
            prefix, _, suffix = pattern.partition("*")
            if len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix):
                return True
        elif name == pattern:
            return True
    return False


class Fields:
    """The fields of one JSON body; each getter checks one, ``done()`` refuses the rest."""

    def __init__(self, body: Mapping[str, Any], allowed: Iterable[str]) -> None:
        self.body = body
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise bad(unknown[0], f"unknown field (expected one of {', '.join(sorted(allowed))})")

    def has(self, name: str) -> bool:
        return name in self.body

    def string(self, name: str, *, required: bool = False, max_len: int = 200,
               nullable: bool = True) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required or (name in self.body and not nullable):
                raise bad(name, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            raise bad(name, f"expected a non-empty string, got {_kind(value)}")
        if len(value) > max_len:
            raise bad(name, f"at most {max_len} characters")
        return value.strip()

    def choice(self, name: str, options: tuple[str, ...], default: str | None = None) -> str | None:
        value = self.body.get(name, default)
        if value is None and default is None and name not in self.body:
            return None
        if value not in options:
            raise bad(name, f"must be one of {'|'.join(options)}, got {value!r}")
        return str(value)

    def tier(self, default: str | None = None) -> str | None:
        return self.choice("tier", TIERS, default)

    def role(self, default: str | None = None) -> str | None:
        return self.choice("role", ROLES, default)

    def count(self, name: str) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(name, f"expected a non-negative integer or null, got {value!r}")
        return value

    def models(self, name: str, configured: list[str]) -> list[str] | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise bad(name, f"expected a list of model names or null, got {_kind(value)}")
        out: list[str] = []
        for i, model in enumerate(value):
            if not isinstance(model, str) or not model:
                raise bad(f"{name}[{i}]", f"expected a model name, got {_kind(model)}")
            if not model_allowed(model, configured):
                raise bad(f"{name}[{i}]", f"no model {model!r} is configured on this gateway")
            out.append(model)
        return out

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise bad(name, f"expected an object, got {_kind(value)}")
        return value

    def expiry(self, now: dt.datetime) -> dt.datetime | None:
        """``expires_at`` (ISO-8601) or ``expires_in`` (a duration from now); not both."""
        if self.has("expires_at") and self.has("expires_in"):
            raise bad("expires_in", "give expires_at or expires_in, not both")
        if self.body.get("expires_in") is not None:
            delta = parse_duration(self.body["expires_in"], "expires_in")
            if delta <= dt.timedelta(0):
                raise bad("expires_in", "must be more than 0")
            return now + delta
        if self.body.get("expires_at") is not None:
            when = parse_instant(self.body["expires_at"], "expires_at")
            if when <= now:
                raise bad("expires_at", "is in the past (revoke the key instead)")
            return when
        return None


def page_params(query: Mapping[str, str]) -> tuple[int, int]:
    """``offset`` and ``limit`` from a query string (limit 1…200, default 50)."""
    return (_query_int(query, "offset", 0, 0, 10**9),
            _query_int(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))


def flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise bad(name, f"expected true or false, got {value!r}")


def _query_int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    # ASCII digits only, and few of them: "²" passes isdigit() but not int(), and int()
    # refuses more than 4300 digits (either would be a 500)
    if not (value.isascii() and value.isdigit() and len(value) <= 12) or not low <= int(value) <= high:
        raise bad(name, f"expected an integer from {low} to {high}, got {value!r}")
    return int(value)


def _kind(value: object) -> str:
    return {list: "an array", dict: "an object", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), "null")
