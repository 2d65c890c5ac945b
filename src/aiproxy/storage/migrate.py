"""Schema migrations (Alembic), shipped inside the package so ``pip install`` brings them.

``await upgrade(url)`` brings a database to the newest schema and keeps every row;
it runs on start-up (``database.migrate_on_start``, default true) and as
``aiproxy db upgrade``. On a database already at the newest revision it is one
query. On PostgreSQL an advisory lock makes replicas that start together migrate
one after the other; the later ones find nothing to do.

Adding a migration (developers): change ``models.py``, then from the repo root
``alembic -c src/aiproxy/storage/migrations/alembic.ini revision --autogenerate -m "…"``
against a database at head, and read what it wrote.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from aiproxy.storage.db import create_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_LOCK_ID = 0x61697078  # "aipx": the advisory lock replicas take while migrating


def alembic_config(url: str | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head() -> str:
    """The newest revision this aiproxy ships."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert revision is not None
    return revision


async def upgrade(target: str | AsyncEngine, revision: str = "head") -> str | None:
    """Migrate ``target`` (a URL or an engine) to ``revision``; return where it now is."""
    engine = create_engine(target) if isinstance(target, str) else target
    try:
        async with engine.connect() as connection:
            result = await connection.run_sync(_upgrade, revision)
            await connection.commit()
            return result
    finally:
        if isinstance(target, str):
            await engine.dispose()


async def downgrade(target: str | AsyncEngine, revision: str) -> str | None:
    """Migrate ``target`` back to ``revision`` (``"base"``: an empty schema). Rows in
    dropped tables are lost: for developers and tests, not an operator's command."""
    engine = create_engine(target) if isinstance(target, str) else target
    try:
        async with engine.connect() as connection:
            result = await connection.run_sync(_downgrade, revision)
            await connection.commit()
            return result
    finally:
        if isinstance(target, str):
            await engine.dispose()


async def current(target: str | AsyncEngine) -> str | None:
    """The revision the database is at; None for an empty database."""
    engine = create_engine(target) if isinstance(target, str) else target
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current)
    finally:
        if isinstance(target, str):
            await engine.dispose()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection, revision: str) -> str | None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    if revision == "head" and _current(connection) == head():
        return head()  # the common case on start-up: nothing to do, and nothing loaded
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)
    return _current(connection)


def _downgrade(connection: Connection, revision: str) -> str | None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.downgrade(cfg, revision)
    return _current(connection)
