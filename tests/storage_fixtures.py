"""Database fixtures, on SQLite always and on PostgreSQL when AIPROXY_TEST_DATABASE_URL is set.

- ``db_url``: the URL of a fresh, EMPTY database (a new SQLite file; on PostgreSQL a
  new database ``aiproxy_t_<random>``, dropped after the test). Tests that take it run
  once per backend (ids ``sqlite`` / ``postgresql``).
- ``migrated_url``: the same, upgraded to the newest schema.
- ``engine``: an async engine on ``migrated_url``, disposed after the test.
- ``store``: a :class:`~aiproxy.storage.keys.KeyStore` on that engine.

A URL is a plain URL, so a started ``aiproxy serve`` can use it too (``database.url``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiproxy.storage import migrate
from aiproxy.storage.db import create_engine
from aiproxy.storage.keys import KeyStore

PG_ENV = "AIPROXY_TEST_DATABASE_URL"
BACKENDS = ["sqlite", *(["postgresql"] if os.environ.get(PG_ENV) else [])]


async def _pg_database() -> AsyncIterator[str]:
    admin_url = make_url(os.environ[PG_ENV]).set(drivername="postgresql+asyncpg")
    name = f"aiproxy_t_{secrets.token_hex(6)}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'aiproxy.db'}"
        return
    async for url in _pg_database():
        yield url


@pytest.fixture
async def migrated_url(db_url: str) -> str:
    await migrate.upgrade(db_url)
    return db_url


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(migrated_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> KeyStore:
    return KeyStore(engine)
