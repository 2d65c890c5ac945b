"""Migrations: an empty database gets the whole schema, a second upgrade keeps every row,
and the migrations describe exactly what the models do (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection

from aiproxy.storage import migrate
from aiproxy.storage.db import DatabaseError, create_engine, parse_url, redact
from aiproxy.storage.keys import KeyStore, hash_key
from aiproxy.storage.models import Base, UsageLog

TABLES = {"tenants", "users", "api_keys", "provider_credentials", "providers", "usage_logs",
          "prompt_templates", "conversations", "conversation_messages"}


def _diff(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                 Base.metadata))


async def test_upgrade_creates_every_table_on_an_empty_database(db_url: str) -> None:
    assert await migrate.current(db_url) is None
    assert await migrate.upgrade(db_url) == migrate.head()
    assert await migrate.current(db_url) == migrate.head()
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            names = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            assert TABLES <= names
            assert await conn.run_sync(_diff) == []  # the migrations build what models.py says
    finally:
        await engine.dispose()


async def test_a_second_upgrade_changes_nothing_and_keeps_every_row(migrated_url: str) -> None:
    engine = create_engine(migrated_url)
    try:
        store = KeyStore(engine)
        tenant = await store.create_tenant("acme")
        secret, key = await store.create_key(tenant_id=tenant.id, tier="pro", allowed_models=["m1"])
        async with store.sessions() as s, s.begin():
            s.add(UsageLog(provider="mock", model="m1", key_id=key.id, tenant_id=tenant.id,
                           total_tokens=12, meta={"request_id": "r1"}))
        assert await migrate.upgrade(engine) == migrate.head()
        assert await migrate.upgrade(migrated_url) == migrate.head()
        found = await store.lookup_by_hash(hash_key(secret))
        assert found is not None and found.id == key.id and found.allowed_models == ("m1",)
        async with store.sessions() as s:
            log = (await s.scalars(select(UsageLog))).one()
        assert (log.key_id, log.total_tokens, log.meta) == (key.id, 12, {"request_id": "r1"})
    finally:
        await engine.dispose()


async def test_downgrade_to_base_drops_the_schema_and_upgrade_rebuilds_it(migrated_url: str) -> None:
    assert await migrate.downgrade(migrated_url, "base") is None
    assert await migrate.current(migrated_url) is None
    engine = create_engine(migrated_url)
    try:
        async with engine.connect() as conn:
            assert not TABLES & set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert await migrate.upgrade(migrated_url) == migrate.head()


async def test_timestamps_come_back_aware_utc(store: KeyStore) -> None:
    east = dt.timezone(dt.timedelta(hours=5))
    when = dt.datetime(2030, 1, 2, 8, 0, tzinfo=east)
    _, key = await store.create_key(expires_at=when)
    got = await store.get_key(key.id, tenant=None)
    assert got is not None and got.expires_at is not None
    assert got.expires_at.utcoffset() == dt.timedelta(0)
    assert got.expires_at == when  # the same instant
    assert got.created_at.tzinfo is not None


async def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: object) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_replicas_starting_together_migrate_once(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("replicas share a database on PostgreSQL; SQLite serves one machine")
    results = await asyncio.gather(*(migrate.upgrade(db_url) for _ in range(4)))
    assert results == [migrate.head()] * 4


def test_head_is_the_newest_migration_file() -> None:
    assert migrate.script_head() == migrate.HEAD


def test_urls_are_checked_and_redacted() -> None:
    assert parse_url("sqlite:///./x.db").drivername == "sqlite+aiosqlite"
    assert parse_url("postgresql://u:p@h/db").drivername == "postgresql+asyncpg"
    with pytest.raises(DatabaseError, match="unsupported driver 'mysql'"):
        parse_url("mysql://u:p@h/db")
    with pytest.raises(DatabaseError, match="not a database URL"):
        parse_url("not a url")
    shown = redact("postgresql+asyncpg://aiproxy:hunter2secret@db/aiproxy")
    assert "hunter2secret" not in shown and "aiproxy@db" not in shown and "***" in shown
