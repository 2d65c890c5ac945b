"""The store API: keys (create, lookup, rotate, revoke, expire), tenants and users, each
scoped by tenant, on SQLite and PostgreSQL. No plaintext key ever reaches a row."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
from collections.abc import Sequence

import pytest
from sqlalchemy import text

from aiproxy.storage.db import DatabaseUnavailable, create_engine
from aiproxy.storage.keys import ALL_TENANTS, Conflict, KeyStore, NotFound, StoreError, hash_key
from tests.helpers import free_port

T0 = dt.datetime(2030, 5, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


async def _all_text(store: KeyStore) -> str:
    """Every value of every row of every table, as one string."""
    out = []
    async with store.engine.connect() as conn:
        for table in ("tenants", "users", "api_keys", "provider_credentials"):
            for row in (await conn.execute(text(f"SELECT * FROM {table}"))).all():
                out.append(" ".join(map(str, row)))
    return "\n".join(out)


async def test_a_new_key_is_256_random_bits_and_only_its_hash_and_prefix_are_stored(store: KeyStore) -> None:
    secret, key = await store.create_key(name="ci")
    other, _ = await store.create_key(name="ci")
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", secret) and secret != other
    assert key.prefix == secret[3:11] and key.display == f"sk-{secret[3:11]}…"
    assert "hash" not in key.to_dict() and secret not in str(key.to_dict())
    rows = await _all_text(store)
    assert secret not in rows and secret[3:] not in rows
    assert hashlib.sha256(secret.encode()).hexdigest() in rows  # what is stored instead
    found = await store.lookup_by_hash(hash_key(secret))
    assert found is not None and found.id == key.id and found.status(dt.datetime.now(dt.UTC)) == "active"
    assert await store.lookup_by_hash(hash_key(secret + "x")) is None


async def test_key_takes_its_users_tenant_and_attributes(store: KeyStore) -> None:
    tenant = await store.create_tenant("acme")
    user = await store.create_user(tenant_id=tenant.id, email="ann@acme.test", role="admin")
    _, key = await store.create_key(user_id=user.id, tier="pro", role="admin", allowed_models=["a", "b"],
                                    monthly_limit_tokens=1000, metadata={"team": "ml"})
    got = await store.get_key(key.id, tenant=tenant.id)
    assert got is not None
    assert (got.user_id, got.tenant_id, got.tier, got.role) == (user.id, tenant.id, "pro", "admin")
    assert got.allowed_models == ("a", "b") and got.monthly_limit_tokens == 1000
    assert got.metadata == {"team": "ml"}


async def test_bad_key_attributes_are_refused_with_the_reason(store: KeyStore) -> None:
    with pytest.raises(StoreError, match="tier must be one of free, starter, pro, enterprise"):
        await store.create_key(tier="gold")
    with pytest.raises(StoreError, match="allowed_models must be a list"):
        await store.create_key(allowed_models="gpt-4o")
    with pytest.raises(StoreError, match="timezone-aware"):
        await store.create_key(expires_at=dt.datetime(2030, 1, 1))
    with pytest.raises(NotFound, match="no user 'usr_nope'"):
        await store.create_key(user_id="usr_nope")
    with pytest.raises(NotFound, match="no tenant"):
        await store.create_key(tenant_id="ten_nope")
    await store.create_tenant("acme")
    with pytest.raises(Conflict):
        await store.create_tenant("acme")


async def test_every_read_and_change_is_scoped_to_the_callers_tenant(store: KeyStore) -> None:
    a, b = await store.create_tenant("a"), await store.create_tenant("b")
    ua = await store.create_user(tenant_id=a.id)
    ub = await store.create_user(tenant_id=b.id)
    _, ka = await store.create_key(user_id=ua.id)
    _, kb = await store.create_key(user_id=ub.id)
    _, kn = await store.create_key()  # the gateway's own, no tenant
    with pytest.raises(NotFound):  # a user of tenant b cannot get a key in tenant a
        await store.create_key(user_id=ub.id, tenant_id=a.id)
    assert [k.id for k in await store.list_keys(tenant=a.id)] == [ka.id]
    assert [k.id for k in await store.list_keys(tenant=None)] == [kn.id]
    assert {k.id for k in await store.list_keys(tenant=ALL_TENANTS)} == {ka.id, kb.id, kn.id}
    assert [u.id for u in await store.list_users(tenant=b.id)] == [ub.id]
    assert await store.get_key(kb.id, tenant=a.id) is None
    assert await store.get_user(ub.id, tenant=a.id) is None
    with pytest.raises(NotFound):
        await store.revoke_key(kb.id, tenant=a.id)
    with pytest.raises(NotFound):
        await store.rotate_key(kb.id, tenant=a.id)
    with pytest.raises(NotFound):
        await store.update_key(kb.id, tenant=a.id, tier="pro")
    assert not await store.delete_key(kb.id, tenant=a.id)
    assert not await store.delete_user(ub.id, tenant=a.id)
    still = await store.get_key(kb.id, tenant=b.id)
    assert still is not None and still.revoked_at is None and still.tier == "free"


async def test_rotate_makes_a_new_secret_and_revokes_the_old_one(store: KeyStore) -> None:
    clock = Clock()
    store.clock = clock
    changed: list[Sequence[str]] = []
    store.subscribe(changed.append)
    old_secret, old = await store.create_key(tier="pro", allowed_models=["m"], monthly_limit_tokens=5)
    new_secret, new = await store.rotate_key(old.id, tenant=None)
    assert new_secret != old_secret and new.id != old.id
    assert (new.tier, new.allowed_models, new.monthly_limit_tokens) == ("pro", ("m",), 5)
    was = await store.lookup_by_hash(hash_key(old_secret))
    assert was is not None and was.status(T0) == "revoked" and was.replaced_by == new.id
    now = await store.lookup_by_hash(hash_key(new_secret))
    assert now is not None and now.status(T0) == "active"
    assert changed == [[old.id]]
    with pytest.raises(StoreError, match="is revoked"):
        await store.rotate_key(old.id, tenant=None)


async def test_rotate_with_grace_keeps_the_old_key_working_until_it_ends(store: KeyStore) -> None:
    clock = Clock()
    store.clock = clock
    old_secret, old = await store.create_key()
    await store.rotate_key(old.id, tenant=None, grace=dt.timedelta(minutes=10))
    was = await store.lookup_by_hash(hash_key(old_secret))
    assert was is not None
    assert was.status(T0 + dt.timedelta(minutes=9)) == "active"
    assert was.status(T0 + dt.timedelta(minutes=10)) == "revoked"


async def test_revoke_expire_and_listeners(store: KeyStore) -> None:
    clock = Clock()
    store.clock = clock
    changed: list[Sequence[str]] = []
    store.subscribe(changed.append)
    _, key = await store.create_key(expires_at=T0 + dt.timedelta(days=1))
    assert key.status(T0) == "active" and key.status(T0 + dt.timedelta(days=1)) == "expired"
    revoked = await store.revoke_key(key.id, tenant=None)
    assert revoked.revoked_at == T0 and revoked.status(T0) == "revoked"
    clock.now = T0 + dt.timedelta(hours=1)
    again = await store.revoke_key(key.id, tenant=None)
    assert again.revoked_at == T0  # the first revocation stands
    assert changed == [[key.id], [key.id]]


async def test_deleting_a_user_or_tenant_takes_their_keys_and_says_which(store: KeyStore) -> None:
    changed: list[Sequence[str]] = []
    store.subscribe(changed.append)
    tenant = await store.create_tenant("t")
    user = await store.create_user(tenant_id=tenant.id)
    s1, k1 = await store.create_key(user_id=user.id)
    s2, k2 = await store.create_key(tenant_id=tenant.id)
    assert await store.delete_user(user.id, tenant=tenant.id)
    assert changed == [[k1.id]] and await store.lookup_by_hash(hash_key(s1)) is None
    assert await store.delete_tenant(tenant.id)
    assert changed[-1] == [k2.id] and await store.lookup_by_hash(hash_key(s2)) is None


async def test_update_and_touch(store: KeyStore) -> None:
    _, key = await store.create_key()
    updated = await store.update_key(key.id, tenant=None, tier="enterprise", allowed_models=None,
                                     metadata={"x": 1})
    assert (updated.tier, updated.metadata) == ("enterprise", {"x": 1})
    with pytest.raises(StoreError, match="cannot change hash"):
        await store.update_key(key.id, tenant=None, hash="0" * 64)
    await store.touch({key.id: T0})
    got = await store.get_key(key.id, tenant=None)
    assert got is not None and got.last_used_at == T0


async def test_an_unreachable_database_is_reported_as_unavailable(tmp_path: object) -> None:
    before = set(threading.enumerate())
    for url in (f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing",
                f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/x.db"):
        engine = create_engine(url)
        try:
            with pytest.raises(DatabaseUnavailable, match="the database is unavailable"):
                await KeyStore(engine).lookup_by_hash("0" * 64)
        finally:
            await engine.dispose()
    # aiosqlite stops a connection that failed to open by posting to its thread a future
    # nobody awaits; the thread answers on this test's loop, which must still be open then
    # (else it raises "Event loop is closed" into whichever test runs next).
    for thread in set(threading.enumerate()) - before:
        thread.join(5)


async def test_live_keys_include_a_rotated_key_in_its_grace_period(store: KeyStore) -> None:
    clock = Clock()
    store.clock = clock
    _, graced = await store.create_key(name="graced")
    _, gone = await store.create_key(name="gone")
    _, new = await store.rotate_key(graced.id, tenant=None, grace=dt.timedelta(minutes=5))
    await store.revoke_key(gone.id, tenant=None)
    live = {k.id for k in await store.list_keys(tenant=None, include_revoked=False)}
    assert live == {graced.id, new.id}
    clock.now = T0 + dt.timedelta(minutes=5)
    assert {k.id for k in await store.list_keys(tenant=None, include_revoked=False)} == {new.id}


async def test_update_refuses_a_naive_expiry_and_a_negative_limit(store: KeyStore) -> None:
    _, key = await store.create_key()
    with pytest.raises(StoreError, match="timezone-aware"):
        await store.update_key(key.id, tenant=None, expires_at=dt.datetime(2031, 1, 1))
    with pytest.raises(StoreError, match="at least 0"):
        await store.update_key(key.id, tenant=None, monthly_limit_tokens=-1)
