"""The async engine for ``database.url`` and the session factory.

``sqlite+aiosqlite:///./aiproxy.db`` (the default) needs no setup; every connection
turns on WAL (readers don't block the writer) and foreign keys (off by default in
SQLite). ``postgresql+asyncpg://user:pass@host/db`` is for several replicas; its pool
is sized for one process (``database.pool_size``, default 10, plus as many again
in overflow), pings connections before use and recycles them hourly, so a restarted
PostgreSQL costs one failed check, not a burst of errors.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

DEFAULT_URL = "sqlite+aiosqlite:///./aiproxy.db"
DEFAULT_POOL_SIZE = 10


class DatabaseError(Exception):
    """The database is misconfigured or cannot be reached; the message says which."""


class DatabaseUnavailable(DatabaseError):
    """The database did not answer (down, unreachable, timed out): a 503, not a 500."""


def parse_url(url: str) -> URL:
    """A URL the async engine can use; ``DatabaseError`` naming the problem otherwise."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database.url is not a database URL: {redact(url)!r}") from None
    driver = parsed.drivername
    if driver in ("sqlite", "sqlite+pysqlite"):
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif driver in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif driver not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise DatabaseError(f"database.url: unsupported driver {driver!r} "
                            "(use sqlite+aiosqlite:// or postgresql+asyncpg://)")
    return parsed


def redact(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except ArgumentError:
        return "<unparseable URL>"
    return parsed.render_as_string(hide_password=True)


def is_sqlite(url: str | URL) -> bool:
    return (url if isinstance(url, URL) else make_url(url)).get_backend_name() == "sqlite"


def create_engine(url: str, *, echo: bool = False, pool_size: int | None = None) -> AsyncEngine:
    """An engine for ``url`` (see the module docstring). No connection is made yet."""
    parsed = parse_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        # aiosqlite runs each connection on its own thread; a small queue pool keeps them.
        kwargs["connect_args"] = {"timeout": 15}
    else:
        size = pool_size or DEFAULT_POOL_SIZE
        kwargs.update(pool_size=size, max_overflow=size, pool_pre_ping=True, pool_recycle=3600,
                      pool_timeout=10, connect_args={"timeout": 5, "command_timeout": 30})
    engine = create_async_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; fsync at checkpoints
        cursor.execute("PRAGMA busy_timeout=15000")
    finally:
        cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded rows readable after commit (no lazy reloads in async)."""
    return async_sessionmaker(engine, expire_on_commit=False)
