"""The usage stage's costs: µs per call added to the response path (after-call builds a row
and appends it to the queue), and rows/s the flusher writes (batches of multi-row INSERT …
ON CONFLICT DO NOTHING) on SQLite and, given a URL, PostgreSQL; and the spool's append rate.

    python bench/usage_stage.py [--pg postgresql+asyncpg://postgres@127.0.0.1:5432/test]

With --pg, a scratch database ``aiproxy_bench_<random>`` is made on that server and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.datastructures import Headers

from aiproxy.builtin.usage import UsageLogs
from aiproxy.builtin.usage import rows as usage_rows
from aiproxy.builtin.usage.flusher import Flusher
from aiproxy.builtin.usage.spool import Spool
from aiproxy.builtin.usage.writer import Writer
from aiproxy.call import Call, Principal, Usage
from aiproxy.config import parse_config
from aiproxy.storage import migrate
from aiproxy.storage.db import create_engine


def a_call() -> Call:
    call = Call(request_id="0123456789abcdef01234567", operation="chat", model="gpt-4o-mini",
                body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                stream=False, headers=Headers({}))
    call.principal = Principal(id="key_0123456789abcdef01234567", user="usr_0123456789abcdef01234567",
                               tenant="ten_0123456789abcdef01234567", tier="pro")
    call.deployment = SimpleNamespace(provider=SimpleNamespace(name="openai"))  # type: ignore[assignment]
    call.upstream_model = "gpt-4o-mini-2024-07-18"
    call.usage = Usage(21, 12, 33)
    call.cost = 0.0000104
    attempt = {"deployment": "openai/gpt-4o-mini#0", "status": 200, "latency_ms": 312.4}
    call.metadata.update(deployment="openai/gpt-4o-mini#0", attempts=[attempt])
    call.finished = call.started + 0.3124
    return call


def per_call_us(n: int = 100_000, rounds: int = 7) -> float:
    stage = UsageLogs(parse_config({"usage": {"max_queue": n + 1, "batch_size": n + 1}}, env={}))
    # as after start-up, but with no flusher task running: the response path alone
    flusher = Flusher(Spool(Path(tempfile.gettempdir()) / "unused.spool"), None, batch_size=n + 1,
                      max_queue=n + 1, flush_interval=1, retry_max=1)
    stage.flusher, stage._enqueue = flusher, flusher.enqueue
    call = a_call()
    best = float("inf")
    for _ in range(rounds):
        flusher.queue.clear()
        began = time.perf_counter()
        for _ in range(n):
            stage.aiproxy_after_call(call)
        best = min(best, time.perf_counter() - began)
    assert len(flusher.queue) == n
    return best / n * 1e6


def materialize_us(n: int = 50_000, rounds: int = 5) -> float:
    """The flusher's share per row: the captured call made a row (uid, timestamps, metadata)."""
    captured = usage_rows.capture(a_call(), None)
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(n):
            usage_rows.materialize(captured)
        best = min(best, time.perf_counter() - began)
    return best / n * 1e6


def rows(n: int) -> list[dict[str, Any]]:
    call = a_call()
    return [usage_rows.from_call(call, None) for _ in range(n)]


async def rows_per_second(url: str, n: int = 20_000, batch: int = 500) -> float:
    await migrate.upgrade(url)
    engine = create_engine(url)
    try:
        writer = Writer(engine, timeout=60)
        data = rows(n)
        await writer.write(data[:batch])  # warm: connection, compiled statement
        data = rows(n)
        began = time.perf_counter()
        for start in range(0, n, batch):
            await writer.write(data[start:start + batch])
        elapsed = time.perf_counter() - began
        async with engine.connect() as conn:
            total = (await conn.execute(text("SELECT count(*) FROM usage_logs"))).scalar()
        assert total == n + batch, total
        return n / elapsed
    finally:
        await engine.dispose()


def spool_rows_per_second(folder: Path, n: int = 20_000, batch: int = 500) -> float:
    spool = Spool(folder / "bench.spool")
    data = rows(n)
    began = time.perf_counter()
    for start in range(0, n, batch):
        spool.append(data[start:start + batch])
    elapsed = time.perf_counter() - began
    spool.close()
    return n / elapsed


async def on_scratch_pg(admin_url: str) -> float:
    admin = make_url(admin_url).set(drivername="postgresql+asyncpg")
    name = f"aiproxy_bench_{secrets.token_hex(4)}"
    eng = create_async_engine(admin, isolation_level="AUTOCOMMIT")
    async with eng.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        return await rows_per_second(admin.set(database=name).render_as_string(hide_password=False))
    finally:
        async with eng.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await eng.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", help="a PostgreSQL server URL to make a scratch database on")
    args = parser.parse_args()
    print(f"response path (after-call: capture, append): {per_call_us():.2f} µs/call")
    print(f"flusher, making a row of it:                {materialize_us():.2f} µs/row")
    with tempfile.TemporaryDirectory() as folder:
        print(f"spool append (batches of 500):    {spool_rows_per_second(Path(folder)):,.0f} rows/s")
        sqlite = asyncio.run(rows_per_second(f"sqlite+aiosqlite:///{folder}/bench.db"))
        print(f"flusher, SQLite (batches of 500): {sqlite:,.0f} rows/s")
    if args.pg:
        pg = asyncio.run(on_scratch_pg(args.pg))
        print(f"flusher, PostgreSQL (batches of 500): {pg:,.0f} rows/s")


if __name__ == "__main__":
    main()
