"""Database fixtures, on SQLite always and on PostgreSQL when AIPROXY_TEST_DATABASE_URL is set.

- ``db_url``: the URL of a fresh, EMPTY database (a new SQLite file; on PostgreSQL a
  new database ``aiproxy_t_<random>``, dropped after the test). Tests that take it run
  once per backend (ids ``sqlite`` / ``postgresql``).
- ``migrated_url``: the same, at the newest schema. Migrated once per session into a
  template (a SQLite file, a PostgreSQL ``aiproxy_tpl_<random>`` database) that each
  test gets its own copy of (a file copy; ``CREATE DATABASE … TEMPLATE``), so a test
  still has a database nobody else touches, without running Alembic again.
- ``engine``: an async engine on ``migrated_url``, disposed after the test.
- ``store``: a :class:`~aiproxy.storage.keys.KeyStore` on that engine.

A URL is a plain URL, so a started ``aiproxy serve`` can use it too (``database.url``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiproxy.storage import migrate
from aiproxy.storage.db import create_engine
from aiproxy.storage.keys import KeyStore

PG_ENV = "AIPROXY_TEST_DATABASE_URL"
BACKENDS = ["sqlite", *(["postgresql"] if os.environ.get(PG_ENV) else [])]


def _admin_url() -> Any:
    return make_url(os.environ[PG_ENV]).set(drivername="postgresql+asyncpg")


def _pg_url(name: str) -> str:
    return str(_admin_url().set(database=name).render_as_string(hide_password=False))


async def _pg_admin(statement: str) -> None:
    admin = create_async_engine(_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await admin.dispose()


def _in_thread(work: Callable[[], Awaitable[Any]]) -> None:
    """Run ``work`` on its own loop in another thread: a session fixture must neither use
    nor replace the loop pytest-asyncio gives each test."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(work())).result()  # type: ignore[arg-type]


async def _pg_database(template: str | None = None) -> AsyncIterator[str]:
    name = f"aiproxy_t_{secrets.token_hex(6)}"
    await _pg_admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield _pg_url(name)
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A PostgreSQL database at head, made once per session, for ``migrated_url`` to copy."""
    name = f"aiproxy_tpl_{secrets.token_hex(6)}"
    _in_thread(lambda: _pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        _in_thread(lambda: migrate.upgrade(_pg_url(name)))  # disposes its engine: no one stays connected
        yield name
    finally:
        _in_thread(lambda: _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at head, made once per session, for ``migrated_url`` to copy."""
    path = tmp_path_factory.mktemp("template") / "aiproxy.db"
    _in_thread(lambda: migrate.upgrade(f"sqlite+aiosqlite:///{path}"))
    return path


def _copy_sqlite(template: Path, into: Path) -> Path:
    target = into / "aiproxy.db"
    for suffix in ("", "-wal"):  # the WAL is checkpointed away on close; copied if not
        if Path(f"{template}{suffix}").exists():
            shutil.copyfile(f"{template}{suffix}", f"{target}{suffix}")
    return target


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'aiproxy.db'}"
        return
    async for url in _pg_database():
        yield url


@pytest.fixture
async def migrated_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{_copy_sqlite(request.getfixturevalue('sqlite_template'), tmp_path)}"
        return
    async for url in _pg_database(request.getfixturevalue("pg_template")):
        yield url


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
