"""Usage rows survive the database going away: calls keep being answered, rows spool to
the file and are replayed in order when it is back; exactly one row per call. On
PostgreSQL the connection is cut by a TCP forwarder in front of the server; on SQLite
another connection holds the write lock (BEGIN EXCLUSIVE), so writes fail for real.
And a load of 10,000 calls leaves 10,000 rows; a server killed with rows only in its
spool loses none of them (the next start replays it)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import orjson
from sqlalchemy.engine import make_url

from aiproxy.storage.db import create_engine
from tests.helpers import started_proxy
from tests.tcp_proxy import TcpProxy
from tests.usage_support import MOCK_CHAT, count, rows, server_config, usage_config, wait_for

FAST = {"flush_interval": 0.02, "batch_size": 50, "write_timeout": 0.5, "retry_max": 0.1}


class Outage:
    """Makes the database refuse writes and brings it back, for either backend."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.sqlite_path = parsed.database if parsed.get_backend_name() == "sqlite" else None
        self.proxy = None if self.sqlite_path else TcpProxy.for_url(url)
        self.url = url if self.proxy is None else self.proxy.url(url)
        self._lock: sqlite3.Connection | None = None

    def cut(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()
            return
        assert self.sqlite_path is not None
        # call it off the event loop (to_thread): a flusher between its INSERT and its
        # COMMIT needs the loop to finish, and a blocked loop would wait on itself
        self._lock = sqlite3.connect(self.sqlite_path, isolation_level=None, timeout=10,
                                     check_same_thread=False)
        self._lock.execute("BEGIN EXCLUSIVE")  # every other writer now gets SQLITE_BUSY

    def restore(self) -> None:
        if self.proxy is not None:
            self.proxy.restore()
        elif self._lock is not None:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            self._lock = None

    def close(self) -> None:
        self.restore()
        if self.proxy is not None:
            self.proxy.close()


@contextmanager
def outage(url: str) -> Iterator[Outage]:
    o = Outage(url)
    try:
        yield o
    finally:
        o.close()


async def test_database_cut_mid_load_loses_nothing_and_writes_nothing_twice(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    n = 1500
    spool = tmp_path / "spool"
    with outage(migrated_url) as db:
        async with gateway(usage_config(db.url, spool, **FAST)) as (http, _):
            usage = http._transport.app.state.usage  # type: ignore[attr-defined]

            async def calls(start: int, stop: int) -> None:
                for i in range(start, stop):
                    r = await http.post("/v1/chat/completions", json=MOCK_CHAT,
                                        headers={"x-request-id": f"load-{i:05d}"})
                    assert r.status_code == 200, r.text
                    if i % 20 == 0:
                        await asyncio.sleep(0.002)  # let the flusher run, as socket I/O would

            async with asyncio.timeout(120):
                await calls(0, 500)
                await asyncio.to_thread(db.cut)
                await calls(500, 1000)
                await wait_for(lambda: _true(usage.down), what="the flusher to see the outage")
                await calls(1000, 1200)  # answered while the database is away
                assert usage.counts["spooled"] > 0 and usage.spool.pending()
                db.restore()
                await calls(1200, n)
                await wait_for(lambda: _count_is(migrated_url, n), within=60,
                               what=f"{n} rows after the database came back")
                assert not usage.spool.pending()
                assert usage.counts["write_errors"] > 0 and usage.counts["dropped"] == 0
    written = await rows(migrated_url)
    assert [row["request_id"] for row in written] == [f"load-{i:05d}" for i in range(n)]  # in order
    assert len({row["uid"] for row in written}) == n
    assert not spool.exists()  # replayed, then deleted


async def _true(value: bool) -> bool:
    return value


async def _count_is(url: str, n: int) -> bool:
    return await count(url) >= n


async def test_ten_thousand_calls_leave_ten_thousand_rows(gateway: Any, migrated_url: str,
                                                         tmp_path: Path) -> None:
    n, concurrency = 10_000, 50
    async with gateway(usage_config(migrated_url, tmp_path / "spool")) as (http, _):

        async def one(i: int) -> None:
            r = await http.post("/v1/chat/completions", json=MOCK_CHAT,
                                headers={"x-request-id": f"k-{i:05d}"})
            assert r.status_code == 200

        async with asyncio.timeout(240):
            for start in range(0, n, concurrency):
                await asyncio.gather(*(one(i) for i in range(start, start + concurrency)))
        usage = http._transport.app.state.usage  # type: ignore[attr-defined]
        assert usage.counts["queued"] == n and usage.counts["dropped"] == 0
    written = await rows(migrated_url)
    assert len(written) == n
    assert {row["request_id"] for row in written} == {f"k-{i:05d}" for i in range(n)}
    assert len({row["uid"] for row in written}) == n


async def test_a_server_killed_with_rows_only_in_its_spool_loses_none(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    sent = [f"crash-{i:03d}" for i in range(20)]
    with outage(migrated_url) as db, \
            started_proxy(server_config(db.url, spool, **FAST), tmp_path) as server:
        db.cut()
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=15) as sdk:
            for rid in sent:
                done = sdk.chat.completions.create(**MOCK_CHAT, extra_headers={"x-request-id": rid})
                assert done.choices[0].message.content
        await wait_for(lambda: _true(_spooled(spool) == sent), what="the rows in the server's spool")
        os.kill(server.process.pid, signal.SIGKILL)  # no shutdown, no last flush
        server.process.wait(10)
        db.restore()
    assert await count(migrated_url) == 0
    # a new gateway on the same spool replays it at start-up
    async with gateway(usage_config(migrated_url, spool)) as _:
        await wait_for(lambda: _count_is(migrated_url, len(sent)), what="the spool replayed")
    assert [row["request_id"] for row in await rows(migrated_url)] == sent
    assert not spool.exists()  # replayed, then deleted


def _spooled(spool: Path) -> list[str]:
    if not spool.exists():
        return []
    return [orjson.loads(line)["request_id"] for line in spool.read_bytes().splitlines() if line]



class TableLock:
    """Holds the usage table so the flusher's INSERT waits (in flight, neither done nor
    failed): BEGIN EXCLUSIVE on SQLite, LOCK TABLE on PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outage = Outage(url)
        self.engine: Any = None
        self.conn: Any = None

    async def hold(self) -> None:
        if self.outage.sqlite_path:
            await asyncio.to_thread(self.outage.cut)
            return
        self.engine = create_engine(self.url)
        self.conn = await self.engine.connect()
        await self.conn.exec_driver_sql("LOCK TABLE usage_logs IN ACCESS EXCLUSIVE MODE")

    async def release(self) -> None:
        if self.outage.sqlite_path:
            self.outage.restore()
            return
        await self.conn.rollback()
        await self.conn.close()
        await self.engine.dispose()


async def _call(http: Any, request_id: str) -> None:
    r = await http.post("/v1/chat/completions", json=MOCK_CHAT, headers={"x-request-id": request_id})
    assert r.status_code == 200


async def test_a_full_queue_while_a_batch_is_in_flight_keeps_order_and_writes_nothing_twice(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    lock = TableLock(migrated_url)
    cfg = usage_config(migrated_url, spool, flush_interval=0.02, batch_size=5, max_queue=5, write_timeout=5)
    async with gateway(cfg) as (http, _), asyncio.timeout(60):
        usage = http._transport.app.state.usage  # type: ignore[attr-defined]

        await lock.hold()
        try:
            for i in range(5):
                await _call(http, f"f-{i:02d}")  # a batch: the flusher takes it and waits on the lock
            await wait_for(lambda: _true(usage._inflight is not None), what="a batch in flight")
            for i in range(5, 12):
                # 5..9 fill the queue; 10 finds it full; 11 starts a new queue
                await _call(http, f"f-{i:02d}")
            # the batch in flight, the queue and call 10 went to the spool, in that order
            assert _spooled(spool) == [f"f-{i:02d}" for i in range(11)]
            assert usage._inflight is not None  # still waiting: its fate is unknown
        finally:
            await lock.release()
        await wait_for(lambda: _count_is(migrated_url, 12), what="all 12 rows")
    written = await rows(migrated_url)
    assert [row["request_id"] for row in written] == [f"f-{i:02d}" for i in range(12)]
    assert not spool.exists()


async def test_shutdown_with_the_database_away_spools_and_the_next_start_replays(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    sent = [f"down-{i:02d}" for i in range(30)]
    with outage(migrated_url) as db:
        async with gateway(usage_config(db.url, spool, **FAST)) as (http, _):
            await asyncio.to_thread(db.cut)
            for rid in sent:
                r = await http.post("/v1/chat/completions", json=MOCK_CHAT, headers={"x-request-id": rid})
                assert r.status_code == 200
        # shut down while the database was away: nothing written, everything in the spool
        assert _spooled(spool) == sent
        db.restore()
        assert await count(migrated_url) == 0
        async with gateway(usage_config(db.url, spool, **FAST)) as _:
            await wait_for(lambda: _count_is(migrated_url, len(sent)), what="the spool replayed")
    assert [row["request_id"] for row in await rows(migrated_url)] == sent
    assert not spool.exists()


async def test_a_write_that_hangs_past_write_timeout_spools_and_the_rows_land_once(
        gateway: Any, migrated_url: str, tmp_path: Path) -> None:
    """The database holds the INSERT (a table lock) longer than write_timeout: the write is
    abandoned, its batch and what follows go to the spool, and once the lock goes every row
    is in exactly once, in order (a connection abandoned mid-statement must not poison the
    next writes)."""
    spool = tmp_path / "spool"
    lock = TableLock(migrated_url)
    cfg = usage_config(migrated_url, spool, flush_interval=0.02, batch_size=5, write_timeout=0.3,
                       retry_max=0.1)
    async with gateway(cfg) as (http, _), asyncio.timeout(60):
        usage = http._transport.app.state.usage  # type: ignore[attr-defined]

        await lock.hold()
        try:
            for i in range(12):
                await _call(http, f"h-{i:02d}")
            await wait_for(lambda: _true(usage.counts["write_errors"] > 0), what="a write to time out")
            await wait_for(lambda: _true(len(_spooled(spool)) >= 5), what="the batch in the spool")
        finally:
            await lock.release()
        for i in range(12, 20):
            await _call(http, f"h-{i:02d}")
        await wait_for(lambda: _count_is(migrated_url, 20), what="all 20 rows")
        await wait_for(lambda: _true(not usage.spool.pending()), what="the spool replayed")
    written = await rows(migrated_url)
    assert [row["request_id"] for row in written] == [f"h-{i:02d}" for i in range(20)]
    assert usage.counts["dropped"] == 0 and usage.counts["rejected"] == 0
