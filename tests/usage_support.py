"""Shared by the usage-log tests: a config with a database and the usage stage, and the rows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import select

from aiproxy.config import Config
from aiproxy.storage.db import create_engine
from aiproxy.storage.models import UsageLog
from tests.conftest import make_config

MOCK_CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hi"}]}


def usage_config(db_url: str, spool: Any, sections: dict[str, Any] | None = None,
                 **usage: Any) -> Config:
    """The test config on ``db_url``, the usage stage spooling to ``spool``; the cost
    stage left out, so a test can set ``call.cost`` itself."""
    return make_config(database={"url": db_url}, usage={"spool_path": str(spool), **usage},
                       plugins={"dir": None, "disable": ["cost"]}, **(sections or {}))


def server_config(db_url: str, spool: Any, **usage: Any) -> dict[str, Any]:
    """The YAML (as a dict) of a started ``aiproxy serve`` with the mock and the usage stage."""
    return {"server": {"access_log": False}, "database": {"url": db_url},
            "providers": {"mock": {"plugin": "mock"}}, "models": [{"name": "mock-*", "provider": "mock"}],
            "plugins": {"dir": None, "disable": ["cost"]},
            "usage": {"spool_path": str(spool), **usage}}


async def rows(db_url: str) -> list[dict[str, Any]]:
    """Every usage row as a dict of its columns (``metadata`` included), in insertion order."""
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            table = UsageLog.__table__
            result = await conn.execute(select(table).order_by(table.c.id))
            return [r._asdict() for r in result.all()]
    finally:
        await engine.dispose()


async def count(db_url: str) -> int:
    return len(await rows(db_url))


async def wait_for(check: Any, within: float = 20.0, what: str = "condition") -> None:
    """Poll an async ``check`` until it is true, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.02)
