"""The BYOK cache of tenants' provider keys: one lookup for concurrent misses, no stale
answer re-cached after a change, and a deleted tenant's keys dropped at once."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event

from aiproxy.builtin.tenant_keys import TenantKeys
from tests.conftest import make_config

OLD_KEY, NEW_KEY = "sk-tenant-own-provider-key-old-01", "sk-tenant-own-provider-key-new-02"


def _config(url: str) -> Any:
    return make_config(database={"url": url}, keys={"required": True},
                       security={"encryption_key": base64.b64encode(os.urandom(32)).decode()})


def _started(http: Any) -> tuple[Any, TenantKeys]:
    app = http._transport.app
    return app, app.state.plugin_manager.get_plugin("tenant_keys")


async def test_concurrent_misses_for_one_tenant_share_one_lookup(
        gateway: Callable[..., Any], migrated_url: str) -> None:
    async with gateway(_config(migrated_url)) as (http, _):
        app, byok = _started(http)
        tenant = await app.state.key_store.create_tenant("a")
        await app.state.credential_store.put(tenant.id, "openai", OLD_KEY)
        queries: list[str] = []
        event.listen(app.state.database.sync_engine, "before_cursor_execute",
                     lambda *args: queries.append(args[2]))
        got = await asyncio.gather(*(byok.keys_of(tenant.id) for _ in range(3)))
        assert got == [{"openai": OLD_KEY}] * 3
        assert sum("provider_credentials" in q for q in queries) == 1


async def test_a_lookup_begun_before_a_change_is_neither_cached_nor_joined(
        gateway: Callable[..., Any], migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with gateway(_config(migrated_url)) as (http, _):
        app, byok = _started(http)
        creds = app.state.credential_store
        tenant = await app.state.key_store.create_tenant("a")
        await creds.put(tenant.id, "openai", OLD_KEY)
        read, release = asyncio.Event(), asyncio.Event()
        real = creds.for_tenant

        async def held(tenant_id: str) -> dict[str, str]:  # the first lookup reads, then waits
            keys = await real(tenant_id)
            if not read.is_set():
                read.set()
                await release.wait()
            return keys

        monkeypatch.setattr(creds, "for_tenant", held)
        first = asyncio.create_task(byok.keys_of(tenant.id))
        await read.wait()  # it has read OLD_KEY from the database
        await creds.put(tenant.id, "openai", NEW_KEY)  # this replica forgets the tenant meanwhile
        later = asyncio.create_task(byok.keys_of(tenant.id))  # its first step runs before `first` resumes
        release.set()
        assert await first == {"openai": OLD_KEY}  # begun before the change: that answer stands
        assert await later == {"openai": NEW_KEY}  # asked after: not handed the old lookup's answer
        assert await byok.keys_of(tenant.id) == {"openai": NEW_KEY}

        # and alone, an old answer arriving after the change is not cached
        read.clear()
        release.clear()
        byok.forget(tenant.id)
        first = asyncio.create_task(byok.keys_of(tenant.id))
        await read.wait()
        await creds.put(tenant.id, "openai", OLD_KEY)
        release.set()
        assert await first == {"openai": NEW_KEY}
        assert await byok.keys_of(tenant.id) == {"openai": OLD_KEY}


async def test_deleting_a_tenant_drops_its_cached_provider_keys(
        gateway: Callable[..., Any], migrated_url: str) -> None:
    async with gateway(_config(migrated_url)) as (http, _):
        app, byok = _started(http)
        tenant = await app.state.key_store.create_tenant("a")
        await app.state.credential_store.put(tenant.id, "openai", OLD_KEY)
        assert await byok.keys_of(tenant.id) == {"openai": OLD_KEY}  # now cached
        assert await app.state.key_store.delete_tenant(tenant.id)
        assert await byok.keys_of(tenant.id) == {}
