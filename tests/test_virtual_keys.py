"""The virtual-key stage in a running app over a real database (SQLite, and PostgreSQL
when configured): principals, the cache (no query per authenticated call), 401s that
say why, revocation, the database failing mid-run, and ``last_used_at`` batching."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from starlette.applications import Starlette

from aiproxy import hookimpl
from aiproxy.builtin.keys import VirtualKeys
from aiproxy.call import Call, Principal
from aiproxy.storage.db import create_engine, session_factory
from aiproxy.storage.keys import KeyStore
from tests.conftest import make_config
from tests.helpers import error_of, free_port, with_plugins

MOCK = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
MASTER = "mk-master-for-tests"


class Seen:
    """Records the principal every call reaches the before-call stage with."""

    def __init__(self) -> None:
        self.principals: list[Principal | None] = []

    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        self.principals.append(call.principal)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Env:
    http: httpx.AsyncClient
    app: Starlette
    store: KeyStore
    keys: VirtualKeys
    seen: Seen
    clock: Clock
    queries: list[str]

    async def chat(self, key: str | None, body: dict[str, Any] = MOCK) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self.http.post("/v1/chat/completions", json=body, headers=headers)

    def key_queries(self) -> int:
        return sum("api_keys" in q for q in self.queries)


@pytest.fixture
def env(gateway: Callable[..., Any], migrated_url: str) -> Callable[..., Any]:
    @asynccontextmanager
    async def start(server: dict[str, Any] | None = None, **keys: Any) -> AsyncIterator[Env]:
        config = make_config(database={"url": migrated_url}, keys={"required": True, **keys},
                             **({"server": server} if server else {}))
        seen = Seen()
        async with gateway(config, plugin_manager=with_plugins(config, seen=seen)) as (http, _):
            app: Starlette = http._transport.app  # type: ignore[attr-defined]
            plugin = app.state.plugin_manager.get_plugin("keys")
            clock = Clock()
            plugin.monotonic = clock
            queries: list[str] = []
            event.listen(app.state.database.sync_engine, "before_cursor_execute",
                         lambda *args: queries.append(args[2]))
            yield Env(http, app, app.state.key_store, plugin, seen, clock, queries)

    return start


async def test_a_key_authenticates_as_its_principal_with_no_query_after_the_first(env: Any) -> None:
    async with env() as e:
        tenant = await e.store.create_tenant("acme")
        user = await e.store.create_user(tenant_id=tenant.id, email="a@acme.test")
        secret, key = await e.store.create_key(user_id=user.id, tier="pro", allowed_models=["mock-gpt"],
                                               monthly_limit_tokens=5000, name="ci",
                                               metadata={"team": "ml", "monthly_limit_tokens": None})
        e.queries.clear()
        for _ in range(5):
            r = await e.chat(secret)
            assert r.status_code == 200, r.text
        assert e.key_queries() == 1  # the first call looked it up; the cache answered the rest
        p = e.seen.principals[-1]
        assert p is not None
        assert (p.id, p.kind, p.user, p.tenant, p.tier) == (key.id, "key", user.id, tenant.id, "pro")
        assert p.roles == ("member",) and p.allowed_models == ("mock-gpt",)
        assert p.metadata["monthly_limit_tokens"] == 5000 and p.metadata["key_name"] == "ci"
        assert p.metadata["team"] == "ml"  # the key's own metadata, which cannot override its limit
        assert secret not in repr(p)


@pytest.mark.parametrize("key", ["hello", "sk-short", "Bearer", "sk-" + "!" * 43],
                         ids=["word", "short", "scheme", "bad-chars"])
async def test_malformed_keys_get_401_without_touching_the_database(env: Any, key: str) -> None:
    async with env() as e:
        e.queries.clear()
        r = await e.chat(key)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert e.queries == []


async def test_unknown_keys_get_401_and_are_remembered_briefly(env: Any) -> None:
    async with env(negative_ttl=5) as e:
        ghost = "sk-" + "A" * 43
        e.queries.clear()
        for _ in range(3):
            r = await e.chat(ghost)
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert e.key_queries() == 1
        e.clock.t += 5
        await e.chat(ghost)
        assert e.key_queries() == 2
        r = await e.chat(None)
        assert r.status_code == 401 and "No API key provided" in error_of(r)["message"]


async def test_revoking_through_this_replica_takes_effect_at_once(env: Any) -> None:
    async with env() as e:
        secret, key = await e.store.create_key()
        assert (await e.chat(secret)).status_code == 200
        await e.store.revoke_key(key.id, tenant=None)
        r = await e.chat(secret)
        assert r.status_code == 401
        err = error_of(r)
        assert err["code"] == "revoked_api_key" and "was revoked" in err["message"]
        assert f"sk-{key.prefix}" in err["message"] and secret not in r.text


async def test_revoking_on_another_replica_takes_effect_within_the_ttl(env: Any, migrated_url: str) -> None:
    async with env(cache_ttl=30) as e:
        secret, key = await e.store.create_key()
        assert (await e.chat(secret)).status_code == 200
        other = create_engine(migrated_url)
        try:
            await KeyStore(other).revoke_key(key.id, tenant=None)  # another replica's store
        finally:
            await other.dispose()
        e.clock.t += 29
        assert (await e.chat(secret)).status_code == 200  # still cached here
        e.clock.t += 1
        r = await e.chat(secret)
        assert r.status_code == 401 and error_of(r)["code"] == "revoked_api_key"


async def test_expired_key_gets_401_saying_so(env: Any) -> None:
    async with env() as e:
        when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        secret, _ = await e.store.create_key(expires_at=when)
        assert (await e.chat(secret)).status_code == 200
        e.keys.now = lambda: when + dt.timedelta(seconds=1)
        r = await e.chat(secret)
        assert r.status_code == 401
        err = error_of(r)
        assert err["code"] == "expired_api_key" and "expired at" in err["message"]


async def test_a_model_the_key_may_not_use_is_403_naming_it(env: Any) -> None:
    async with env() as e:
        secret, _ = await e.store.create_key(allowed_models=["mock-gpt"])
        r = await e.chat(secret, {**MOCK, "model": "mock-claude"})
        assert r.status_code == 403
        err = error_of(r)
        assert err["code"] == "model_not_allowed" and "'mock-claude'" in err["message"]
        assert (await e.chat(secret)).status_code == 200


async def test_rotation_with_grace_serves_both_then_only_the_new(env: Any) -> None:
    async with env() as e:
        old_secret, old = await e.store.create_key(tier="starter")
        assert (await e.chat(old_secret)).status_code == 200
        new_secret, new = await e.store.rotate_key(old.id, tenant=None, grace=dt.timedelta(minutes=5))
        assert (await e.chat(old_secret)).status_code == 200
        assert (await e.chat(new_secret)).status_code == 200
        assert [p.id for p in e.seen.principals[-2:] if p] == [old.id, new.id]
        e.keys.now = lambda: dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
        assert error_of(await e.chat(old_secret))["code"] == "revoked_api_key"
        assert (await e.chat(new_secret)).status_code == 200


async def test_the_master_key_still_works_and_costs_no_lookup(env: Any) -> None:
    async with env(server={"master_key": MASTER}) as e:
        e.queries.clear()
        r = await e.chat(MASTER)
        assert r.status_code == 200 and e.queries == []
        p = e.seen.principals[-1]
        assert p is not None and p.kind == "master" and "admin" in p.roles


async def test_concurrent_first_calls_of_one_key_share_one_query(env: Any) -> None:
    async with env() as e:
        secret, _ = await e.store.create_key()
        e.queries.clear()
        answers = await asyncio.gather(*(e.chat(secret) for _ in range(10)))
        assert [r.status_code for r in answers] == [200] * 10
        assert e.key_queries() == 1


async def test_database_down_mid_run_cached_keys_work_new_ones_get_503(
        env: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with env(cache_ttl=30) as e:
        cached, _ = await e.store.create_key()
        fresh, _ = await e.store.create_key()
        assert (await e.chat(cached)).status_code == 200
        assert (await e.http.get("/ready")).status_code == 200
        dead = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/gone")
        e.store.sessions = session_factory(dead)  # the database goes away
        database = e.app.state.plugin_manager.get_plugin("database")
        live, database.engine = database.engine, dead
        try:
            ready = await e.http.get("/ready")
            assert ready.status_code == 503
            assert [c["ok"] for c in ready.json()["checks"] if c["name"] == "database"] == [False]
            with caplog.at_level(logging.INFO):
                assert (await e.chat(cached)).status_code == 200
                e.clock.t += 60  # past its TTL: kept while the database cannot answer
                assert (await e.chat(cached)).status_code == 200
                r = await e.chat(fresh)
            assert r.status_code == 503, r.text
            err = error_of(r)
            assert err["type"] == "service_unavailable" and err["code"] == "service_unavailable"
            assert r.headers["retry-after"] == "5"
            assert "Traceback" not in caplog.text
        finally:
            database.engine = live
            await dead.dispose()


async def test_a_key_deleted_elsewhere_is_not_served_from_the_stale_cache_when_the_database_fails(
        env: Any, migrated_url: str) -> None:
    async with env(cache_ttl=30, negative_ttl=5) as e:
        secret, key = await e.store.create_key()
        assert (await e.chat(secret)).status_code == 200  # cached
        other = create_engine(migrated_url)
        try:
            assert await KeyStore(other).delete_key(key.id, tenant=None)  # another replica
        finally:
            await other.dispose()
        e.clock.t += 31
        assert (await e.chat(secret)).status_code == 401  # the database says: no such key
        e.clock.t += 6  # past the negative TTL too
        dead = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/gone")
        e.store.sessions = session_factory(dead)  # the database goes away
        try:
            r = await e.chat(secret)
            assert r.status_code == 503, r.text  # not 200 from the entry of a deleted key
        finally:
            await dead.dispose()


async def test_last_used_at_is_written_in_batches_not_per_call(env: Any) -> None:
    async with env(flush_interval=0) as e:
        secret, key = await e.store.create_key()
        e.queries.clear()
        for _ in range(3):
            assert (await e.chat(secret)).status_code == 200
        assert not any(q.lstrip().upper().startswith("UPDATE") for q in e.queries)
        got = await e.store.get_key(key.id, tenant=None)
        assert got is not None and got.last_used_at is None
        await e.keys.flush()
        got = await e.store.get_key(key.id, tenant=None)
        assert got is not None and got.last_used_at is not None
        assert sum(q.lstrip().upper().startswith("UPDATE") for q in e.queries) == 1


async def test_shutdown_flushes_last_used_at(env: Any, migrated_url: str) -> None:
    async with env(flush_interval=3600) as e:
        secret, key = await e.store.create_key()
        assert (await e.chat(secret)).status_code == 200
    engine = create_engine(migrated_url)
    try:
        got = await KeyStore(engine).get_key(key.id, tenant=None)
        assert got is not None and got.last_used_at is not None
    finally:
        await engine.dispose()


async def test_without_required_keys_a_keyless_call_is_anonymous_but_a_revoked_key_is_not(
        gateway: Callable[..., Any], migrated_url: str) -> None:
    config = make_config(database={"url": migrated_url})
    async with gateway(config) as (http, _):
        store: KeyStore = http._transport.app.state.key_store  # type: ignore[attr-defined]
        secret, key = await store.create_key()
        await store.revoke_key(key.id, tenant=None)
        assert (await http.post("/v1/chat/completions", json=MOCK)).status_code == 200
        fake = await http.post("/v1/chat/completions", json=MOCK, headers={"authorization": "Bearer sk-x"})
        assert fake.status_code == 200  # an SDK's placeholder key: anonymous, as before
        r = await http.post("/v1/chat/completions", json=MOCK, headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 401 and error_of(r)["code"] == "revoked_api_key"


async def test_a_flood_of_made_up_keys_neither_evicts_real_ones_nor_takes_the_pool(env: Any) -> None:
    async with env(max_unknown=50, max_lookups=2) as e:
        secret, _ = await e.store.create_key()
        assert (await e.chat(secret)).status_code == 200
        inside, most = 0, 0
        real_lookup = e.store.lookup_by_hash

        async def counted(digest: str) -> Any:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            try:
                await asyncio.sleep(0.002)
                return await real_lookup(digest)
            finally:
                inside -= 1

        e.store.lookup_by_hash = counted  # type: ignore[method-assign]
        garbage = [f"sk-{i:043d}" for i in range(200)]
        answers = await asyncio.gather(*(e.chat(k) for k in garbage))
        assert {r.status_code for r in answers} == {401}
        assert most == 2  # never more than max_lookups at once
        assert len(e.keys.unknown) <= 50
        e.queries.clear()
        assert (await e.chat(secret)).status_code == 200
        assert e.key_queries() == 0  # the real key is still cached
