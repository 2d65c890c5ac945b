"""Bring your own key: AES-256-GCM at rest, rotation of ENCRYPTION_KEY, and a tenant's own
provider key on that tenant's upstream calls (and nobody else's)."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from aiproxy.cli import main
from aiproxy.config import Config
from aiproxy.plugins import PluginError, build_plugin_manager
from aiproxy.storage.credentials import CredentialStore
from aiproxy.storage.crypto import Cipher, CryptoError, cipher_from, parse_key
from aiproxy.storage.keys import KeyStore
from tests.conftest import OPENAI_BASE, make_config
from tests.helpers import KEY, error_of

OLD, NEW = os.urandom(32), os.urandom(32)
B64 = base64.b64encode
TENANT_KEY = "sk-tenant-a-own-provider-key-0001"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_ciphertexts_are_fresh_bound_to_their_row_and_keyed() -> None:
    cipher = Cipher(OLD)
    a, b = cipher.encrypt("secret-value", b"t1/openai"), cipher.encrypt("secret-value", b"t1/openai")
    assert a != b and "secret-value" not in a  # a new nonce each time
    assert a.startswith(f"v1:{cipher.current_id}:")
    assert cipher.decrypt(a, b"t1/openai") == "secret-value"
    with pytest.raises(CryptoError, match="belongs to another row"):
        cipher.decrypt(a, b"t2/openai")
    tampered = a[:-4] + ("AAAA" if not a.endswith("AAAA") else "BBBB")
    with pytest.raises(CryptoError, match="altered"):
        cipher.decrypt(tampered, b"t1/openai")
    with pytest.raises(CryptoError, match="neither ENCRYPTION_KEY nor in ENCRYPTION_KEY_PREVIOUS"):
        Cipher(NEW).decrypt(a, b"t1/openai")
    assert Cipher(NEW, [OLD]).decrypt(a, b"t1/openai") == "secret-value"


def test_encryption_keys_are_checked() -> None:
    assert parse_key(B64(OLD).decode()) == OLD
    assert parse_key(OLD.hex()) == OLD
    assert parse_key(base64.urlsafe_b64encode(OLD).decode().rstrip("=")) == OLD
    with pytest.raises(CryptoError, match="must be 32 bytes"):
        parse_key(B64(b"x" * 16).decode())
    with pytest.raises(CryptoError, match="neither base64 nor hex"):
        parse_key("not a key!")
    assert cipher_from({"encryption_key": ""}) is None
    with pytest.raises(CryptoError, match=r"previous_encryption_keys .* is set but"):
        cipher_from({"previous_encryption_keys": B64(OLD).decode()})
    both = cipher_from({"encryption_key": B64(NEW).decode(),
                        "previous_encryption_keys": f" {B64(OLD).decode()} ,"})
    assert both is not None and len(both.key_ids) == 2


def test_a_bad_encryption_key_stops_start_up_naming_it() -> None:
    with pytest.raises(PluginError, match=r"plugin 'database' \(builtin\) failed to start: CryptoError: "
                       r"security.encryption_key \(ENCRYPTION_KEY\) must be 32 bytes"):
        build_plugin_manager(make_config(security={"encryption_key": B64(b"short").decode()}))


async def _everything(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM provider_credentials"))).all()
    return "\n".join(" ".join(map(str, r)) for r in rows)


def _byok_config(migrated_url: str, **overrides: Any) -> Config:
    """Keys required, stored in ``migrated_url``, tenants' provider keys encrypted with NEW."""
    return make_config(database={"url": migrated_url}, keys={"required": True},
                       security={"encryption_key": B64(NEW).decode()}, **overrides)


async def test_only_ciphertext_is_stored_and_it_cannot_move_rows(engine: AsyncEngine) -> None:
    a, b = await KeyStore(engine).create_tenant("a"), await KeyStore(engine).create_tenant("b")
    creds = CredentialStore(engine, Cipher(OLD))
    listed = await creds.put(a.id, "openai", TENANT_KEY)
    await creds.put(b.id, "openai", "sk-tenant-b-own-provider-key-0002")
    assert TENANT_KEY not in str(listed) and "ciphertext" not in listed
    assert TENANT_KEY not in await _everything(engine)
    assert await creds.for_tenant(a.id) == {"openai": TENANT_KEY}
    async with engine.begin() as conn:  # copy a's ciphertext into b's row
        await conn.execute(text("UPDATE provider_credentials SET ciphertext = "
                                "(SELECT ciphertext FROM provider_credentials WHERE tenant_id = :a) "
                                "WHERE tenant_id = :b"), {"a": a.id, "b": b.id})
    with pytest.raises(CryptoError, match="belongs to another row"):
        await creds.for_tenant(b.id)
    with pytest.raises(CryptoError, match="neither ENCRYPTION_KEY"):
        await CredentialStore(engine, Cipher(NEW)).for_tenant(a.id)


async def test_rotation_re_encrypts_and_both_keys_open_meanwhile(engine: AsyncEngine) -> None:
    tenants = [await KeyStore(engine).create_tenant(f"t{i}") for i in range(5)]
    before = CredentialStore(engine, Cipher(OLD))
    for i, t in enumerate(tenants[:3]):
        await before.put(t.id, "openai", f"sk-own-{i}-0123456789")
    during = CredentialStore(engine, Cipher(NEW, [OLD]))
    await during.put(tenants[3].id, "openai", "sk-own-3-0123456789")  # written under the new key
    for i in range(4):  # a replica with both keys reads old and new rows
        assert await during.for_tenant(tenants[i].id) == {"openai": f"sk-own-{i}-0123456789"}
    assert await before.for_tenant(tenants[0].id) == {"openai": "sk-own-0-0123456789"}  # old replicas too
    assert await during.reencrypt(batch=2) == 3
    assert {e["key_version"] for t in tenants for e in await during.list(t.id)} == {during.cipher.current_id}
    after = CredentialStore(engine, Cipher(NEW))  # ENCRYPTION_KEY_PREVIOUS dropped
    for i in range(4):
        assert await after.for_tenant(tenants[i].id) == {"openai": f"sk-own-{i}-0123456789"}
    assert await during.reencrypt() == 0
    for i in range(4):
        assert f"sk-own-{i}" not in await _everything(engine)


async def test_rotate_encryption_key_command(migrated_url: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from aiproxy.storage.db import create_engine

    engine = create_engine(migrated_url)
    try:
        tenant = await KeyStore(engine).create_tenant("t")
        await CredentialStore(engine, Cipher(OLD)).put(tenant.id, "openai", TENANT_KEY)
    finally:
        await engine.dispose()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"providers: {{mock: {{plugin: mock}}}}\nmodels: [{{name: m, provider: mock}}]\n"
                   f"database: {{url: '{migrated_url}'}}\n"
                   f"security: {{encryption_key: '{B64(NEW).decode()}', "
                   f"previous_encryption_keys: '{B64(OLD).decode()}'}}\n")
    assert await asyncio.to_thread(main, ["db", "rotate-encryption-key", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "1 provider key(s) re-encrypted" in out and TENANT_KEY not in out
    engine = create_engine(migrated_url)
    try:
        got = await CredentialStore(engine, Cipher(NEW)).for_tenant(tenant.id)
    finally:
        await engine.dispose()
    assert got == {"openai": TENANT_KEY}


async def test_a_tenants_calls_use_its_own_key_and_other_tenants_the_shared_one(
        gateway: Callable[..., Any], migrated_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = _byok_config(migrated_url)
    async with gateway(config) as (http, upstream):
        app = http._transport.app  # type: ignore[attr-defined]
        store: KeyStore = app.state.key_store
        a, b = await store.create_tenant("a"), await store.create_tenant("b")
        key_a, _ = await store.create_key(tenant_id=a.id)
        key_b, _ = await store.create_key(tenant_id=b.id)
        key_none, _ = await store.create_key()
        await app.state.credential_store.put(a.id, "openai", TENANT_KEY)
        route = upstream.post(f"{OPENAI_BASE}/chat/completions").respond(200, json=ANSWER)
        queries: list[str] = []
        event.listen(app.state.database.sync_engine, "before_cursor_execute",
                     lambda *args: queries.append(args[2]))
        seen = {}
        for name, key in (("a", key_a), ("b", key_b), ("none", key_none), ("a-again", key_a)):
            r = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
            assert TENANT_KEY not in r.text and all(TENANT_KEY not in v for v in r.headers.values())
            seen[name] = route.calls.last.request.headers["authorization"]
        assert seen == {"a": f"Bearer {TENANT_KEY}", "b": f"Bearer {KEY}", "none": f"Bearer {KEY}",
                        "a-again": f"Bearer {TENANT_KEY}"}
        assert sum("provider_credentials" in q for q in queries) == 2  # once per tenant, then cached
        await app.state.credential_store.delete(a.id, "openai")  # this replica forgets at once
        await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key_a}"})
        assert route.calls.last.request.headers["authorization"] == f"Bearer {KEY}"
    assert TENANT_KEY not in caplog.text


async def _tenant_with_its_own_key(http: Any, cipher: Cipher | None = None) -> str:
    """A tenant "a" with a virtual key and its own OpenAI key (sealed with ``cipher``, else
    the app's own); the virtual key."""
    app = http._transport.app
    tenant = await app.state.key_store.create_tenant("a")
    key, _ = await app.state.key_store.create_key(tenant_id=tenant.id)
    store = app.state.credential_store if cipher is None else CredentialStore(app.state.database, cipher)
    await store.put(tenant.id, "openai", TENANT_KEY)
    return str(key)


async def test_a_tenant_key_that_does_not_decrypt_is_503_not_the_shared_key(
        gateway: Callable[..., Any], migrated_url: str) -> None:
    config = _byok_config(migrated_url)
    async with gateway(config) as (http, upstream):
        key = await _tenant_with_its_own_key(http, Cipher(OLD))
        route = upstream.post(f"{OPENAI_BASE}/chat/completions").respond(200, json=ANSWER)
        r = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 503 and error_of(r)["code"] == "service_unavailable"
    assert "cannot be decrypted" in error_of(r)["message"] and not route.called


async def test_an_upstream_that_echoes_a_tenants_key_has_it_redacted(
        gateway: Callable[..., Any], migrated_url: str) -> None:
    config = _byok_config(migrated_url)
    async with gateway(config) as (http, upstream):
        key = await _tenant_with_its_own_key(http)
        upstream.post(f"{OPENAI_BASE}/chat/completions").respond(
            400, json={"error": {"message": f"key {TENANT_KEY} may not use this model", "code": "bad"}})
        r = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 400 and "key [redacted] may not use" in error_of(r)["message"]
    assert TENANT_KEY not in r.text


async def test_a_tenants_key_echoed_in_a_mid_stream_error_is_redacted(
        gateway: Callable[..., Any], migrated_url: str) -> None:
    config = _byok_config(migrated_url)
    async with gateway(config) as (http, upstream):
        key = await _tenant_with_its_own_key(http)
        first = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
        stream = (b"data: " + orjson.dumps(first) + b"\n\n" + b"data: "
                  + orjson.dumps({"error": {"message": f"key {TENANT_KEY} was revoked"}}) + b"\n\n")
        upstream.post(f"{OPENAI_BASE}/chat/completions").respond(
            200, content=stream, headers={"content-type": "text/event-stream"})
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True},
                            headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200 and "key [redacted] was revoked" in r.text
    assert TENANT_KEY not in r.text


async def test_a_provider_with_no_shared_key_serves_tenants_that_bring_theirs(
        gateway: Callable[..., Any], migrated_url: str) -> None:
    config = _byok_config(migrated_url,
                          providers={"openai": {"plugin": "openai", "api_base": OPENAI_BASE,
                                                "options": {"tenant_keys_only": True}},
                                     "mock": {"plugin": "mock"}},
                          models=[{"name": "gpt-test", "provider": "openai", "model": "gpt-4o-mini"},
                                  {"name": "mock-*", "provider": "mock"}])
    async with gateway(config) as (http, upstream):
        app = http._transport.app  # type: ignore[attr-defined]
        a, b = await app.state.key_store.create_tenant("a"), await app.state.key_store.create_tenant("b")
        key_a, _ = await app.state.key_store.create_key(tenant_id=a.id)
        key_b, _ = await app.state.key_store.create_key(tenant_id=b.id)
        await app.state.credential_store.put(a.id, "openai", TENANT_KEY)
        route = upstream.post(f"{OPENAI_BASE}/chat/completions").respond(200, json=ANSWER)
        ok = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key_a}"})
        assert ok.status_code == 200
        assert route.calls.last.request.headers["authorization"] == f"Bearer {TENANT_KEY}"
        no = await http.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key_b}"})
    assert no.status_code == 403 and route.call_count == 1
    err = error_of(no)
    assert err["code"] == "provider_key_required" and "provider 'openai'" in err["message"]
