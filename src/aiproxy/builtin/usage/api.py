"""``GET /api/ai/usage``: the usage log of the caller's tenant, a page of rows and totals.

Authorised as the rest of the management API (:mod:`aiproxy.builtin.manage.access`):
the master key sees every tenant (``tenant_id`` narrows it); an admin key sees its own
tenant's rows only (an admin key of no tenant: the rows of no tenant), and naming
another tenant is a 404, as a tenant that does not exist; other keys get 403.

Query: ``since`` / ``until`` (ISO-8601 with a timezone; default the 30 days up to
``until``, or to now),
``model``, ``key_id``, ``user_id``, ``status`` (``error`` or ``ok``), ``limit`` (1-200,
default 50) and ``offset``. The answer: ``data`` (rows, newest first), ``has_more``,
``next_offset``, and ``totals`` over every row that matches (not just the page):
``total``, ``by_model`` and ``by_day`` (UTC days), each with requests, errors, tokens
and cost. Rows still waiting in a replica's queue appear after its next flush
(``usage.flush_interval``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Table, and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement
from starlette.routing import BaseRoute, Route

from aiproxy.builtin.manage import PREFIX
from aiproxy.builtin.manage.access import Caller, Result, endpoint
from aiproxy.builtin.manage.fields import bad, page_params, parse_instant
from aiproxy.errors import ProxyError
from aiproxy.storage.models import UsageLog

TABLE: Table = UsageLog.__table__  # type: ignore[assignment]
DEFAULT_WINDOW = dt.timedelta(days=30)
_FIRST = dt.datetime.min.replace(tzinfo=dt.UTC)
_FILTERS = ("model", "key_id", "user_id")
_KNOWN = {"since", "until", "tenant_id", "status", "limit", "offset", *_FILTERS}


def routes() -> list[BaseRoute]:
    handler = endpoint(list_usage)
    return [Route(f"{PREFIX}/usage", handler, methods=["GET"])]


def _engine(caller: Caller) -> AsyncEngine:
    engine = getattr(caller.request.app.state, "database", None)
    if engine is None:
        raise ProxyError(503, "The usage log needs a database: set database.url in the config.",
                         code="database_not_configured")
    return engine


def _where(caller: Caller) -> list[ColumnElement[bool]]:
    query = caller.request.query_params
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        raise bad(unknown[0], f"unknown parameter (known: {', '.join(sorted(_KNOWN))})")
    c = TABLE.c
    now = dt.datetime.now(dt.UTC)
    until = parse_instant(query["until"], "until") if "until" in query else None
    if "since" in query:
        since = parse_instant(query["since"], "since")
    else:  # the 30 days up to until (a past month asked for by its end), else to now
        end = until or now
        since = end - DEFAULT_WINDOW if end - _FIRST > DEFAULT_WINDOW else _FIRST
    if until is not None and until <= since:
        raise bad("until", "must be after since")
    where: list[ColumnElement[bool]] = [c.created_at >= since]
    if until is not None:
        where.append(c.created_at < until)
    tenant = query.get("tenant_id")
    if caller.master:
        if tenant is not None:
            where.append(c.tenant_id == tenant)
    else:
        if tenant is not None and tenant != caller.principal.tenant:
            raise ProxyError(404, f"No tenant '{tenant[:64]}'.", code="not_found")
        own = caller.principal.tenant
        where.append(c.tenant_id == own if own is not None else c.tenant_id.is_(None))
    for name in _FILTERS:
        if name in query:
            where.append(c[name] == query[name][:200])
    status = query.get("status")
    if status == "error":
        where.append(c.status >= 400)
    elif status == "ok":
        where.append(c.status < 400)
    elif status is not None:
        raise bad("status", f"expected 'ok' or 'error', got {status[:40]!r}")
    return where


def _sums() -> list[Any]:
    c = TABLE.c
    return [func.count().label("requests"),
            func.coalesce(func.sum(case((c.status >= 400, 1), else_=0)), 0).label("errors"),
            func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(c.total_tokens), 0).label("total_tokens"),
            func.coalesce(func.sum(c.cost), 0.0).label("cost")]


def _day(engine: AsyncEngine) -> Any:
    created = TABLE.c.created_at
    if engine.dialect.name == "sqlite":  # stored naive UTC
        return func.strftime("%Y-%m-%d", created)
    return func.to_char(func.timezone("UTC", created), "YYYY-MM-DD")


def _totals(row: Any) -> dict[str, Any]:
    return {"requests": int(row.requests), "errors": int(row.errors),
            "prompt_tokens": int(row.prompt_tokens), "completion_tokens": int(row.completion_tokens),
            "total_tokens": int(row.total_tokens), "cost": round(float(row.cost), 10)}


def _row_json(row: Any) -> dict[str, Any]:
    data = row._asdict()
    data.pop("id", None)
    created = data["created_at"]
    if isinstance(created, dt.datetime):
        data["created_at"] = created.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return {str(k): v for k, v in data.items()}


async def list_usage(caller: Caller) -> Result:
    caller.require_admin()
    engine = _engine(caller)
    where = _where(caller)
    offset, limit = page_params(caller.request.query_params)
    matching = and_(*where)
    day = _day(engine).label("day")
    c = TABLE.c
    async with engine.connect() as conn:
        page = (await conn.execute(select(TABLE).where(matching).order_by(c.id.desc())
                                   .offset(offset).limit(limit + 1))).all()
        total = (await conn.execute(select(*_sums()).where(matching))).one()
        by_model = (await conn.execute(select(c.model, *_sums()).where(matching)
                                       .group_by(c.model).order_by(c.model))).all()
        by_day = (await conn.execute(select(day, *_sums()).where(matching)
                                     .group_by(day).order_by(day))).all()
    more = len(page) > limit
    return 200, {
        "object": "list", "data": [_row_json(r) for r in page[:limit]], "has_more": more,
        "next_offset": offset + limit if more else None,
        "totals": {"total": _totals(total),
                   "by_model": [{"model": r.model, **_totals(r)} for r in by_model],
                   "by_day": [{"day": r.day, **_totals(r)} for r in by_day]},
    }
