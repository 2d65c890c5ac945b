"""One usage row from one finished call: the dict the queue, the spool and the insert share.

On the response path the stage only captures a call's fields into a tuple (no copy,
no formatting, no I/O); the flusher turns captured calls into rows, each with its
``uid``, before it first tries to write them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from aiproxy.storage.models import utcnow

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.errors import ProxyError

log = logging.getLogger("aiproxy.usage")

#: every column the stage writes, with the value a row read back from an older spool lacks
COLUMNS: dict[str, Any] = {
    "uid": None, "created_at": None, "request_id": None, "provider": None, "model": None,
    "operation": None, "user_id": None, "tenant_id": None, "key_id": None, "prompt_tokens": 0,
    "completion_tokens": 0, "total_tokens": 0, "cost": None, "currency": "USD", "latency_ms": None,
    "cached": False, "status": None, "error": None, "meta": {},
}
MAX_ERROR = 2000  #: characters of an error message kept
# things that look like credentials: provider and virtual keys, bearer tokens, key=… pairs.
# Errors reach here scrubbed already; this is the second lock on the door.
_SECRET = re.compile(
    r"(?:sk|pk|rk)-[A-Za-z0-9_\-]{8,}"             # sk-…, sk-ant-…, sk-proj-…
    r"|AIza[0-9A-Za-z_\-]{20,}"                     # Google API keys
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"       # Authorization: Bearer …
    r"|(?i:(?:api[_-]?key|key|token|secret|password)=)[^\s&\"']+"
)


def new_uid(when: float) -> str:
    """The row's identity across retries and replays: its time in milliseconds (48 bits)
    then 80 random bits, as 32 hex digits. Rows written in time order then append to the
    unique index on ``uid`` instead of landing all over it (random uids made every insert
    touch a different page: 2-3x the CPU per row once the table outgrew the page cache)."""
    return f"{int(when * 1000) & 0xFFFFFFFFFFFF:012x}{os.urandom(10).hex()}"


def scrub(message: str) -> str:
    """The message with anything shaped like a credential replaced, cut to MAX_ERROR."""
    return _SECRET.sub("[redacted]", message[:MAX_ERROR])


#: what the response path keeps of a call: its fields, read as they are (no copy, no
#: formatting); the flusher makes the row. Not the Call itself: it holds the whole
#: request and answer, and a full queue of those would be a lot of memory.
Captured = tuple[Any, ...]


def capture(call: Call, error: ProxyError | None) -> Captured:
    """The response path's share of the work (~1 µs): a tuple of references."""
    return (time.time(), call.request_id, call.deployment, call.model, call.operation, call.principal,
            call.usage, call.cost, call.latency, call.cached, call.stream, call.first_byte, call.started,
            call.upstream_model, call.metadata, error)


def from_call(call: Call, error: ProxyError | None) -> dict[str, Any]:
    return materialize(capture(call, error))


def materialize(captured: Captured) -> dict[str, Any]:
    """The row for a captured call, with its new ``uid`` (done once, off the response path)."""
    (when, request_id, deployment, model, operation, principal, usage, cost, latency, cached,
     stream, first_byte, started, upstream_model, metadata, error) = captured
    meta = dict(metadata)
    if upstream_model:
        meta["upstream_model"] = upstream_model
    if stream:
        meta["stream"] = True
        if first_byte is not None:
            meta["first_byte_ms"] = round((first_byte - started) * 1000, 1)
    if principal is not None and principal.kind != "key":
        meta["principal"] = principal.kind
    if usage is not None:
        if usage.cached_tokens:
            meta["cached_tokens"] = usage.cached_tokens
        if usage.cache_write_tokens:
            meta["cache_write_tokens"] = usage.cache_write_tokens
    status = 200
    message = None
    if error is not None:
        status = error.status
        message = scrub(error.message)
        meta["error_type"] = error.type
        if error.code:
            meta["error_code"] = error.code
        if first_byte is not None:
            meta["after_first_byte"] = True  # the client had a 200 and an error event
    return {
        "uid": new_uid(when),
        "created_at": dt.datetime.fromtimestamp(when, dt.UTC),
        "request_id": request_id,
        "provider": deployment.provider.name if deployment is not None else None,
        "model": model or None,
        "operation": operation,
        "user_id": principal.user if principal is not None else None,
        "tenant_id": principal.tenant if principal is not None else None,
        "key_id": principal.id if principal is not None and principal.kind == "key" else None,
        "prompt_tokens": usage.prompt_tokens if usage is not None else 0,
        "completion_tokens": usage.completion_tokens if usage is not None else 0,
        "total_tokens": usage.total_tokens if usage is not None else 0,
        "cost": cost,
        "currency": "USD",
        "latency_ms": None if latency is None else round(latency * 1000),
        "cached": cached,
        "status": status,
        "error": message,
        "meta": meta,
    }


def from_spool(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from the spool (JSON), ready for the insert again."""
    out = {name: row.get(name, default) for name, default in COLUMNS.items()}
    if not isinstance(out["meta"], dict):
        out["meta"] = {}
    created = out["created_at"]
    parsed = None
    if isinstance(created, str):
        with contextlib.suppress(ValueError):
            parsed = dt.datetime.fromisoformat(created)
    if parsed is not None:
        out["created_at"] = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    else:  # a spool edited by hand, or from another version: keep the row, say what it said
        out["created_at"] = utcnow()
        if created is not None:
            out["meta"] = {**out["meta"], "spooled_created_at": str(created)[:100]}
            log.warning("usage spool: row %s (request %s) had created_at %r; written with the "
                        "time of its replay", out["uid"], out["request_id"], str(created)[:100])
    return out
