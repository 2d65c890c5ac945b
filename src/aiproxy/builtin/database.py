"""The database: one engine per app for ``database.url``, migrated on start-up.

Puts ``app.state.database`` (the engine), ``app.state.key_store`` (a
:class:`~aiproxy.storage.keys.KeyStore`) and ``app.state.credential_store`` (tenants'
provider keys, :class:`~aiproxy.storage.credentials.CredentialStore`, encrypted with
``security.encryption_key``) on the app for the stages and management routes;
answers readiness with a ``SELECT 1``. With no ``database.url`` it does nothing:
keys then come from config alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import text
from starlette.applications import Starlette

from aiproxy import hookimpl
from aiproxy.config import Config
from aiproxy.storage import migrate
from aiproxy.storage.commands import migrate_on_start
from aiproxy.storage.credentials import CredentialStore
from aiproxy.storage.crypto import cipher_from
from aiproxy.storage.db import create_engine, redact
from aiproxy.storage.keys import KeyStore

log = logging.getLogger("aiproxy.database")
READY_TIMEOUT = 2.0


class Database:
    def __init__(self, config: Config) -> None:
        self.url = config.database_url
        settings = config.section("database")
        self.echo = settings.get("echo") is True
        pool = settings.get("pool_size")
        self.pool_size = pool if isinstance(pool, int) and pool > 0 else None
        self.migrate = migrate_on_start(config)
        self.cipher = cipher_from(config.section("security"))  # a bad ENCRYPTION_KEY stops start-up
        self.engine: Any = None

    @hookimpl
    async def aiproxy_startup(self, app: Starlette) -> None:
        if not self.url:
            return
        self.engine = create_engine(self.url, echo=self.echo, pool_size=self.pool_size)
        if self.migrate:
            await migrate.upgrade(self.engine)
        app.state.database = self.engine
        app.state.key_store = KeyStore(self.engine)
        app.state.credential_store = CredentialStore(self.engine, self.cipher)
        # deleting a tenant deletes its provider keys: their listeners hear of it
        app.state.key_store.subscribe_tenants(app.state.credential_store._tenant_changed)
        log.info("database: %s", redact(self.url))

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    @hookimpl
    async def aiproxy_readiness(self) -> dict[str, Any] | None:
        if self.engine is None:
            return None
        try:
            async with asyncio.timeout(READY_TIMEOUT), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            return {"name": "database", "ok": False, "detail": type(exc).__name__}
        return {"name": "database", "ok": True, "detail": self.engine.dialect.name}


def aiproxy_plugin(config: Config) -> Database:
    return Database(config)
