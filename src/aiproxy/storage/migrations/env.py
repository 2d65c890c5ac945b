"""Alembic environment, async-aware.

aiproxy runs migrations through :func:`aiproxy.storage.migrate.upgrade`, which opens
an async connection and hands its sync face to this file in
``config.attributes["connection"]``. Run with the ``alembic`` command instead (for
``alembic revision --autogenerate`` while developing), it opens one itself from
``sqlalchemy.url``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from aiproxy.storage.db import create_engine
from aiproxy.storage.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite",  # SQLite can't ALTER much
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    shared = context.config.attributes.get("connection")
    if shared is not None:
        _run(shared)
    else:
        asyncio.run(_run_async(context.config.get_main_option("sqlalchemy.url") or ""))
