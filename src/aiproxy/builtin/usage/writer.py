"""Usage rows into ``usage_logs``: one transaction per batch, an INSERT that skips a
``uid`` already present (``ON CONFLICT (uid) DO NOTHING`` on SQLite and PostgreSQL),
so writing a batch twice leaves one row per call. Values are fitted to their columns
first (strings cut to length, integers to 32 bits, metadata to plain JSON), so a
row's content cannot make the database refuse it."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import orjson
from sqlalchemy import String, Table, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from aiproxy.builtin.usage.rows import COLUMNS
from aiproxy.storage.models import UsageLog

TABLE: Table = UsageLog.__table__  # type: ignore[assignment]
_STRINGS = [c.name for c in TABLE.columns if isinstance(c.type, String) and c.name in COLUMNS]
_LENGTHS = {c.name: c.type.length for c in TABLE.columns
            if isinstance(c.type, String) and c.type.length and c.name in COLUMNS}


class Rejected(Exception):
    """The database refused the rows themselves (not a connection problem)."""


def rejected(exc: BaseException) -> bool:
    """Would this error come back however often the same rows were sent? (Then retrying
    the batch would hold every later row up for ever: it is written row by row instead.)"""
    if isinstance(exc, DataError | IntegrityError):
        return True
    if isinstance(exc, DBAPIError):  # SQLSTATE class 22 (data exception), 23 (integrity)
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(state, str) and state[:2] in ("22", "23")
    return isinstance(exc, StatementError)  # binding failed, before the database saw it


class Writer:
    def __init__(self, engine: AsyncEngine, *, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self.sqlite = engine.dialect.name == "sqlite"
        # SQLite: one prepared INSERT run over the batch by sqlite3's executemany, with the
        # values as the table stores them (no SQLAlchemy bind processing per row: it was
        # most of the writer's CPU). PostgreSQL: one statement for the whole batch, its
        # columns as arrays.

    async def write(self, rows: list[dict[str, Any]]) -> None:
        """All of ``rows`` in one transaction, or none. Raises what the database raised
        (TimeoutError after ``timeout`` seconds)."""
        if not rows:
            return
        params: Any = _tuples(rows) if self.sqlite else _arrays(rows)
        # SQLite is bounded by its busy timeout, never by cancelling: aiosqlite finishes a
        # cancelled statement on its thread anyway, and a connection left mid-transaction
        # would hold the write lock against every other writer.
        async with asyncio.timeout(None if self.sqlite else self.timeout), self.engine.connect() as conn:
            restore = None
            if self.sqlite:  # wait for another writer's lock no longer than our own timeout
                restore = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
                await conn.exec_driver_sql(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
                await conn.commit()
            try:
                async with conn.begin():
                    if self.sqlite:
                        await conn.exec_driver_sql(_SQLITE_INSERT, params)
                    else:
                        await conn.execute(_UNNEST, params)
            finally:
                if restore is not None:
                    try:
                        await conn.exec_driver_sql(f"PRAGMA busy_timeout={int(restore)}")
                        await conn.commit()
                    except BaseException:
                        await conn.invalidate()  # never back to the pool with our timeout
                        raise


# PostgreSQL: INSERT … SELECT FROM unnest(one array per column) ON CONFLICT DO NOTHING
_PG_TYPES = {"uid": "text", "created_at": "timestamptz", "request_id": "text", "provider": "text",
             "model": "text", "operation": "text", "user_id": "text", "tenant_id": "text",
             "key_id": "text", "prompt_tokens": "int", "completion_tokens": "int", "total_tokens": "int",
             "cost": "float8", "currency": "text", "latency_ms": "int", "cached": "bool", "status": "int",
             "error": "text", "metadata": "text"}
_UNNEST = text(
    f"INSERT INTO usage_logs ({', '.join(_PG_TYPES)}) "
    f"SELECT {', '.join('metadata::json' if c == 'metadata' else c for c in _PG_TYPES)} "
    f"FROM unnest({', '.join(f'CAST(:{c} AS {t}[])' for c, t in _PG_TYPES.items())}) "
    f"AS u({', '.join(_PG_TYPES)}) ON CONFLICT (uid) DO NOTHING")


def _arrays(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    fitted = [fit(row) for row in rows]
    return {name: [row[name] for row in fitted] for name in _PG_TYPES}


# SQLite: the values as SQLAlchemy's types would store them: datetimes as naive UTC text
# (its DATETIME storage format), booleans as 0/1, JSON as text
_SQLITE_COLUMNS = tuple(_PG_TYPES)
_SQLITE_INSERT = (f"INSERT INTO usage_logs ({', '.join(_SQLITE_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in _SQLITE_COLUMNS)}) ON CONFLICT (uid) DO NOTHING")


def _tuples(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    out = []
    for row in rows:
        fitted = fit(row)
        created = fitted["created_at"]
        if isinstance(created, dt.datetime):
            fitted["created_at"] = created.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        cost = fitted["cost"]
        if cost is not None and type(cost) is not float:
            fitted["cost"] = float(cost)
        fitted["cached"] = bool(fitted["cached"])
        out.append(tuple(fitted[name] for name in _SQLITE_COLUMNS))
    return out


_INT32 = 2**31 - 1


def fit(row: dict[str, Any]) -> dict[str, Any]:
    """The row as the table takes it: strings cut to their column, metadata as JSON text."""
    out = dict(row)
    for name in _STRINGS:
        value = out.get(name)
        if isinstance(value, str):
            if "\x00" in value:  # a client's NUL: PostgreSQL refuses it in text
                value = value.replace("\x00", "")
            length = _LENGTHS.get(name)
            out[name] = value[:length] if length and len(value) > length else value
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "latency_ms", "status"):
        value = out.get(name)
        if type(value) is not int and value is not None:  # a hand-edited spool, say
            try:
                value = int(value)
            except (TypeError, ValueError):
                value = 0 if COLUMNS[name] == 0 else None
        if isinstance(value, int) and not -_INT32 <= value <= _INT32:  # INTEGER columns
            value = max(-_INT32, min(_INT32, value))
        out[name] = value
    meta = out.pop("meta", None)  # the attribute is "meta", the column "metadata"
    try:
        text_ = orjson.dumps(meta, default=str, option=orjson.OPT_NON_STR_KEYS)
        if b"\\u0000" in text_:
            text_ = orjson.dumps(_no_nul(orjson.loads(text_)))
    except (TypeError, orjson.JSONEncodeError):
        text_ = orjson.dumps({"unserialisable_metadata": repr(meta)[:500].replace("\x00", "")})
    out["metadata"] = text_.decode()
    return out


def _no_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value
