"""Which failures are worth another attempt, and how long to wait before one.

Retryability is decided by what the client would see (the mapped :class:`ProxyError`),
never by guessing at messages: a rate limit (429), an upstream that failed, could not
be reached or sent garbage (502), one that is overloaded (503, from 503/529) and one
that timed out (504, from 408/504 and every timeout) are retried; a request the
upstream refused (400/404/413/422…), the gateway's own credentials being rejected
(``upstream_auth_failed``), a bug in the gateway (500) and a client that left (499)
are not.
"""

from __future__ import annotations

import email.utils
import random
import time

from aiproxy.errors import ProxyError

RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
NOT_RETRYABLE_CODES = frozenset({"upstream_auth_failed", "client_closed_request", "unsupported_operation"})

_CONTEXT_CODES = frozenset({"context_length_exceeded", "context_window_exceeded", "string_above_max_length"})
_CONTEXT_WORDS = ("context length", "context window", "maximum context", "too many tokens",
                  "prompt is too long", "input is too long")
_POLICY_CODES = frozenset({"content_policy_violation", "content_filter", "content_filtered"})
_POLICY_WORDS = ("content policy", "content management policy", "content_filter", "safety system")


def retryable(exc: ProxyError) -> bool:
    return exc.status in RETRYABLE_STATUS and exc.code not in NOT_RETRYABLE_CODES


def too_large(exc: ProxyError) -> bool:
    """The request does not fit the model's context window (a larger model may take it)."""
    if exc.status not in (400, 413, 422):
        return False
    return exc.code in _CONTEXT_CODES or any(w in exc.message.lower() for w in _CONTEXT_WORDS)


def refused_by_policy(exc: ProxyError) -> bool:
    """The upstream's content policy refused the request (another model may not)."""
    if exc.status not in (400, 403, 422):
        return False
    return exc.code in _POLICY_CODES or any(w in exc.message.lower() for w in _POLICY_WORDS)


def retry_after(exc: ProxyError, now: float | None = None) -> float | None:
    """Seconds the upstream asked us to wait (``retry-after-ms``, ``retry-after`` as
    seconds or an HTTP date), or None when it did not say (or said nonsense)."""
    headers = exc.headers
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = -1.0
        if 0 <= value < 86_400:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        value = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, value)
    return value if 0 <= value < 86_400 else None


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff for the ``attempt``-th repeat (1, 2, …), jittered over its upper half:
    a wait in [c/2, c] with c = min(cap, base·2^(attempt-1))."""
    if base <= 0:
        return 0.0
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    return ceiling / 2 + rng.random() * ceiling / 2
