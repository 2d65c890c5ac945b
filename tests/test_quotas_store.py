"""A key's monthly tokens against the database (SQLite, and PostgreSQL when configured):
its limit set through the KeyStore is enforced, its usage is written back in batches,
and a restarted gateway continues from what was written."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from aiproxy import tokens
from aiproxy.builtin.quotas.writeback import UsageWriter
from aiproxy.config import Config
from aiproxy.storage.db import create_engine
from aiproxy.storage.keys import KeyStore
from tests.conftest import make_config
from tests.helpers import error_of
from tests.quotas_support import CHAT_URL, MOCK, Clock, epoch, started

EST = tokens.prompt(MOCK, "mock-gpt")


def db_config(url: str, **quotas: Any) -> Config:
    return make_config(database={"url": url}, keys={"required": True}, quotas={"flush_interval": 0, **quotas},
                       plugins={"dir": None, "disable": ["cost"]})


async def call(app: Any, secret: str) -> Any:
    return await app.http.post(CHAT_URL, json=MOCK, headers={"authorization": f"Bearer {secret}"})


async def test_a_keys_limit_is_enforced_written_back_and_continued_after_a_restart(
        migrated_url: str, store: KeyStore) -> None:
    secret, record = await store.create_key(name="ci", monthly_limit_tokens=60)
    clock = Clock(epoch(2026, 11, 10))
    config = db_config(migrated_url)
    async with started(config, clock) as app:
        used = 0
        while used + EST <= 60:
            r = await call(app, secret)
            assert r.status_code == 200, r.text
            used += r.json()["usage"]["total_tokens"]
        assert (await call(app, secret)).status_code == 429
        stored = await store.get_key(record.id, tenant=None)
        assert stored is not None and stored.current_usage == 0  # not per call: at the flush
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None and (stored.current_usage, stored.usage_period) == (used, "2026-11")

    async with started(config, clock) as app:  # a restart: the month goes on from the row
        refused = await call(app, secret)
        assert refused.status_code == 429
        assert f"{used} are used in 2026-11" in error_of(refused)["message"]
        await app.app.state.key_store.update_key(record.id, tenant=None, monthly_limit_tokens=1000)
        more = await call(app, secret)  # the raised limit applies at once
        assert more.status_code == 200, more.text
        extra = more.json()["usage"]["total_tokens"]
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None and stored.current_usage == used + extra


async def test_usage_from_an_earlier_month_is_not_carried_over(migrated_url: str, store: KeyStore,
                                                                engine: AsyncEngine) -> None:
    secret, record = await store.create_key(name="ci", monthly_limit_tokens=100)
    october = UsageWriter(engine)
    october.add(record.id, "2026-10", 999)
    await october.flush()
    async with started(db_config(migrated_url), Clock(epoch(2026, 11, 1))) as app:
        r = await call(app, secret)
        assert r.status_code == 200, r.text
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None
    assert (stored.current_usage, stored.usage_period) == (r.json()["usage"]["total_tokens"], "2026-11")


async def test_replicas_add_up_and_a_late_flush_never_overwrites_a_newer_month(
        store: KeyStore, engine: AsyncEngine) -> None:
    _, record = await store.create_key(name="ci")
    one, two = UsageWriter(engine), UsageWriter(engine)
    one.add(record.id, "2026-11", 30)
    two.add(record.id, "2026-11", 12)
    one.add(record.id, "2026-11", 8)
    await one.flush()
    await two.flush()
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None and (stored.current_usage, stored.usage_period) == (50, "2026-11")
    one.add(record.id, "2026-12", 5)
    await one.flush()
    two.add(record.id, "2026-11", 7)  # a replica that flushes November's tail after December began
    await two.flush()
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None and (stored.current_usage, stored.usage_period) == (5, "2026-12")


async def test_a_flush_that_fails_keeps_its_counts_for_the_next(store: KeyStore, engine: AsyncEngine,
                                                                tmp_path: Path) -> None:
    _, record = await store.create_key(name="ci")
    broken = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    writer = UsageWriter(broken)
    writer.add(record.id, "2026-11", 40)
    try:
        await writer.flush()
    finally:
        await broken.dispose()
    assert writer.pending == {(record.id, "2026-11"): 40}
    writer.add(record.id, "2026-11", 2)
    writer.engine = engine
    await writer.flush()
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None and stored.current_usage == 42 and writer.pending == {}


async def test_a_stream_that_ends_after_shutdown_is_still_written_back(migrated_url: str,
                                                                        store: KeyStore) -> None:
    """serve cancels streams still running 30 s into a shutdown while the lifespan shutdown
    goes on: a stream's after-call can come after the stage's last flush. Its tokens were
    added to a batch nobody flushed again, so the key's stored month missed them."""
    from starlette.datastructures import Headers

    from aiproxy.call import Call, Usage

    secret, record = await store.create_key(name="ci", monthly_limit_tokens=10_000)
    clock = Clock(epoch(2026, 11, 10))
    async with started(db_config(migrated_url), clock) as app:
        first = await call(app, secret)
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        asking = Call(request_id="late", operation="chat", body={}, model="", stream=True,
                      headers=Headers({"authorization": f"Bearer {secret}"}))
        principal = await app.app.state.hooks.first("aiproxy_authenticate", call=asking)
        late = Call(request_id="late", operation="chat", body=MOCK, model="mock-gpt", stream=True,
                    headers=Headers(), principal=principal)
        assert app.quotas.aiproxy_before_call(late) is None  # in process: done at once (a long stream,
        # begun before the shutdown)
    late.usage = Usage(20, 700, 720)  # it is cut, and settles after every stage stopped
    await app.quotas.settle(late)
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None and (stored.current_usage, stored.usage_period) == (used + 720, "2026-11")


class KeysLock:
    """Holds the api_keys table so a flush's UPDATE waits, in flight: BEGIN EXCLUSIVE on
    SQLite (another connection, off the loop), LOCK TABLE on PostgreSQL."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        self.sqlite = parsed.database if parsed.get_backend_name() == "sqlite" else None
        self.url = url
        self.conn: Any = None
        self.engine: Any = None

    async def hold(self) -> None:
        if self.sqlite:
            import sqlite3

            self.conn = sqlite3.connect(self.sqlite, isolation_level=None, timeout=10,
                                        check_same_thread=False)
            self.conn.execute("BEGIN EXCLUSIVE")
            return
        self.engine = create_engine(self.url)
        self.conn = await self.engine.connect()
        await self.conn.exec_driver_sql("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")

    async def release(self) -> None:
        if self.sqlite:
            await asyncio.to_thread(self.conn.execute, "ROLLBACK")
            self.conn.close()
            return
        await self.conn.rollback()
        await self.conn.close()
        await self.engine.dispose()


async def test_a_shutdown_during_a_periodic_flush_loses_nothing(migrated_url: str, store: KeyStore) -> None:
    """The periodic flush was cancelled at shutdown: one caught inside its UPDATE lost the
    batch it had taken (neither written nor put back for the last flush)."""
    secret, record = await store.create_key(name="ci", monthly_limit_tokens=10_000)
    lock = KeysLock(migrated_url)
    stack = contextlib.AsyncExitStack()
    app = await stack.enter_async_context(started(db_config(migrated_url, flush_interval=0.05),
                                                  Clock(epoch(2026, 11, 10))))
    async with asyncio.timeout(30):
        r = await call(app, secret)
        assert r.status_code == 200, r.text
        used = r.json()["usage"]["total_tokens"]
        await lock.hold()
        try:
            for _ in range(400):  # bounded: until a tick has taken the batch and waits in its UPDATE
                if not app.quotas.writer.pending:  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.01)
            assert not app.quotas.writer.pending  # type: ignore[union-attr]
            stopping = asyncio.create_task(stack.aclose())
            await asyncio.wait([stopping], timeout=0.5)  # a cancelled flush lets it end at once
        finally:
            await lock.release()
        await stopping
    stored = await store.get_key(record.id, tenant=None)
    assert stored is not None and stored.current_usage == used
