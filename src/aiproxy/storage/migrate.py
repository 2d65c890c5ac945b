"""Schema migrations (Alembic), shipped inside the package so ``pip install`` brings them.

``await upgrade(url)`` brings a database to the newest schema and keeps every row;
it runs on start-up (``database.migrate_on_start``, default true) and as
``aiproxy db upgrade``. On a database already at :data:`HEAD` it is one query and
Alembic is not even imported (it costs a worker ~0.3 s of start-up). On PostgreSQL
an advisory lock makes replicas that start together migrate one after the other;
the later ones find nothing to do.

Adding a migration (developers): change ``models.py``, then from the repo root
``alembic -c src/aiproxy/storage/migrations/alembic.ini revision --autogenerate -m "…"``
against a database at head, read what it wrote, and set :data:`HEAD` to its id (a
test checks that it is the newest revision).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from aiproxy.storage.db import create_engine

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = logging.getLogger("aiproxy.database")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD = "0002"  #: the newest revision in migrations/versions
_LOCK_ID = 0x61697078  # "aipx": the advisory lock replicas take while migrating


def alembic_config(url: str | None = None) -> AlembicConfig:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head() -> str:
    """The newest revision this aiproxy ships."""
    return HEAD


def script_head() -> str | None:
    """The head as Alembic reads it from the migration files (what HEAD must equal)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def _on(target: str | AsyncEngine, work: object, *args: object, commit: bool = False) -> str | None:
    engine = create_engine(target) if isinstance(target, str) else target
    try:
        async with engine.connect() as connection:
            result: str | None = await connection.run_sync(work, *args)  # type: ignore[arg-type]
            if commit:
                await connection.commit()
            return result
    finally:
        if isinstance(target, str):
            await engine.dispose()


async def upgrade(target: str | AsyncEngine, revision: str = "head") -> str | None:
    """Migrate ``target`` (a URL or an engine) to ``revision``; return where it now is."""
    return await _on(target, _upgrade, revision, commit=True)


async def downgrade(target: str | AsyncEngine, revision: str) -> str | None:
    """Migrate ``target`` back to ``revision`` (``"base"``: an empty schema). Rows in
    dropped tables are lost: for developers and tests, not an operator's command."""
    return await _on(target, _downgrade, revision, commit=True)


async def current(target: str | AsyncEngine) -> str | None:
    """The revision the database is at; None for an empty database."""
    return await _on(target, _current)


def _current(connection: Connection) -> str | None:
    """``alembic_version`` read with plain SQL (no Alembic import on the start-up path)."""
    if not connection.dialect.has_table(connection, "alembic_version"):
        return None
    try:
        rows = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except DBAPIError:
        return None
    return rows[0] if len(rows) == 1 else None


def _upgrade(connection: Connection, revision: str) -> str | None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    before = _current(connection)
    if revision == "head" and before == HEAD:
        return HEAD  # the common case on start-up: nothing to do
    from alembic import command

    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)
    after = _current(connection)
    if after != before:
        log.info("database schema migrated from %s to %s", before or "nothing", after)
    return after


def _downgrade(connection: Connection, revision: str) -> str | None:
    from alembic import command

    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)
    return _current(connection)
