"""The management API in-process, on SQLite and (with AIPROXY_TEST_DATABASE_URL) PostgreSQL:
who may call what, validation, pagination, the key lifecycle through the API, failures."""

from __future__ import annotations

import datetime as dt

import pytest

from aiproxy.storage.db import create_engine
from aiproxy.storage.keys import KeyStore
from tests.helpers import error_of, free_port
from tests.manage_support import MASTER, Api, make_tenant, manage_app, manage_config


@pytest.fixture
async def api(migrated_url: str):  # type: ignore[no-untyped-def]
    async with manage_app(migrated_url) as a:
        yield a


# ---------------------------------------------------------------- who may call

async def test_no_key_is_401_and_a_wrong_key_is_401(api: Api) -> None:
    for key in (None, "sk-not-a-key-at-all-0000000000000000000000000"):
        r = await api.call("GET", "/keys", key=key)
        assert r.status_code == 401
        assert error_of(r)["code"] == "invalid_api_key"


async def test_without_a_master_key_an_anonymous_caller_still_gets_401(migrated_url: str) -> None:
    config = manage_config(migrated_url, server={})
    async with manage_app(migrated_url, config) as api:
        r = await api.call("GET", "/tenants", key=None)
        assert r.status_code == 401
        assert "master key or an admin key" in error_of(r)["message"]


async def test_a_member_key_gets_403_everywhere_but_its_own_record(api: Api) -> None:
    a = await make_tenant(api, "acme")
    for method, path in [("GET", "/keys"), ("POST", "/keys"), ("GET", f"/keys/{a.member_key_id}"),
                         ("GET", "/users"), ("GET", "/tenants"), ("GET", "/providers"),
                         ("DELETE", f"/keys/{a.admin_key_id}")]:
        r = await api.call(method, path, key=a.member_key, json={} if method == "POST" else None)
        assert r.status_code == 403, (method, path, r.text)
        assert error_of(r)["code"] == "insufficient_permissions"
    r = await api.call("GET", "/keys/self", key=a.member_key)
    assert r.status_code == 200
    me = r.json()
    assert (me["id"], me["tenant_id"], me["allowed_models"]) == (a.member_key_id, a.id, ["mock-gpt"])
    assert "key" not in me and "hash" not in me and a.member_key not in r.text


async def test_a_key_whose_metadata_names_another_key_still_reads_only_itself(api: Api) -> None:
    a = await make_tenant(api, "acme")
    made = (await api.call("POST", "/keys", json={"user_id": a.member_user, "name": "sly",
                                                   "metadata": {"key_id": a.admin_key_id}})).json()
    r = await api.call("GET", "/keys/self", key=made["key"])
    assert r.status_code == 200 and r.json()["id"] == made["id"] != a.admin_key_id


async def test_an_admin_key_may_not_create_or_delete_tenants(api: Api) -> None:
    a = await make_tenant(api, "acme")
    r = await api.call("POST", "/tenants", key=a.admin_key, json={"name": "mine"})
    assert r.status_code == 403 and "master key" in error_of(r)["message"]
    r = await api.call("DELETE", f"/tenants/{a.id}", key=a.admin_key)
    assert r.status_code == 403
    assert (await api.call("GET", f"/tenants/{a.id}")).status_code == 200  # still there
    r = await api.call("PATCH", f"/tenants/{a.id}", key=a.admin_key, json={"name": "acme-renamed"})
    assert r.status_code == 200 and r.json()["name"] == "acme-renamed"


async def test_an_admin_key_creates_keys_and_users_in_its_own_tenant_only(api: Api) -> None:
    a = await make_tenant(api, "acme")
    r = await api.call("POST", "/users", key=a.admin_key, json={"email": "new@acme.test"})
    assert r.status_code == 201 and r.json()["tenant_id"] == a.id
    r = await api.call("POST", "/keys", key=a.admin_key, json={"user_id": r.json()["id"], "tier": "pro"})
    assert r.status_code == 201
    assert (r.json()["tenant_id"], r.json()["tier"]) == (a.id, "pro")
    r = await api.call("POST", "/keys", key=a.admin_key, json={})  # no user: a tenant key
    assert r.status_code == 201 and r.json()["tenant_id"] == a.id and r.json()["user_id"] is None


async def test_an_admin_key_gives_no_key_more_than_it_has_itself(api: Api) -> None:
    """A tenant's admin (tier pro, 1M tokens a month) may not lift its own tenant's tier
    limits, plan, budgets or quota by minting or editing keys; the master key may."""
    a = await make_tenant(api, "acme")
    capped = (await api.call("POST", "/keys", json={"user_id": a.admin_user, "role": "admin", "tier": "pro",
                                                     "monthly_limit_tokens": 1_000_000})).json()
    a.admin_key = capped["key"]
    for body, param in [({"tier": "enterprise"}, "tier"),
                        ({"monthly_limit_tokens": 1_000_001}, "monthly_limit_tokens"),
                        ({"monthly_limit_tokens": None}, "monthly_limit_tokens"),
                        ({"metadata": {"rate_limits": {"requests": 10**9}}}, "metadata.rate_limits")]:
        made = await api.call("POST", "/keys", key=a.admin_key, json=body)
        assert made.status_code == 403 and made.json()["error"]["param"] == param, (body, made.text)
        changed = await api.call("PATCH", f"/keys/{a.member_key_id}", key=a.admin_key, json=body)
        assert changed.status_code == 403 and changed.json()["error"]["param"] == param, (body, changed.text)
    ok = await api.call("POST", "/keys", key=a.admin_key, json={"tier": "starter", "monthly_limit_tokens": 5})
    assert ok.status_code == 201 and (ok.json()["tier"], ok.json()["monthly_limit_tokens"]) == ("starter", 5)
    ok = await api.call("POST", "/keys", key=a.admin_key, json={})
    assert ok.status_code == 201 and ok.json()["monthly_limit_tokens"] == 1_000_000  # its own cap
    # rate limits the master set stay when the admin replaces the rest of the metadata
    limits = {"requests": 3}
    r = await api.call("PATCH", f"/keys/{a.member_key_id}", json={"metadata": {"rate_limits": limits}})
    assert r.status_code == 200
    r = await api.call("PATCH", f"/keys/{a.member_key_id}", key=a.admin_key, json={"metadata": {"team": "x"}})
    assert r.status_code == 200 and r.json()["metadata"] == {"team": "x", "rate_limits": limits}
    r = await api.call("PATCH", f"/keys/{a.member_key_id}", json={"tier": "enterprise"})  # the master may
    assert r.status_code == 200 and r.json()["tier"] == "enterprise"


# ---------------------------------------------------------------- keys

async def test_create_returns_the_plaintext_once_and_never_again(api: Api) -> None:
    r = await api.call("POST", "/keys", json={"name": "ci", "tier": "starter", "expires_in": "30d",
                                              "monthly_limit_tokens": 1000, "allowed_models": ["mock-gpt"],
                                              "metadata": {"team": "ml"}})
    assert r.status_code == 201
    created = r.json()
    secret = created["key"]
    assert secret.startswith("sk-") and len(secret) == 46
    assert created["prefix"] == f"{secret[:11]}…"
    assert (created["tier"], created["monthly_limit_tokens"], created["metadata"]) == ("starter", 1000,
                                                                                      {"team": "ml"})
    expires = dt.datetime.fromisoformat(created["expires_at"])
    assert dt.timedelta(days=29, hours=23) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    for path in ("/keys", f"/keys/{created['id']}"):
        again = await api.call("GET", path)
        assert again.status_code == 200
        assert secret not in again.text and secret[11:] not in again.text
    listed = (await api.call("GET", "/keys")).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tier": "gold"}, "tier", "free|starter|pro|enterprise"),
    ({"role": "owner"}, "role", "admin|member"),
    ({"allowed_models": "mock-gpt"}, "allowed_models", "list of model names"),
    ({"allowed_models": ["mock-gpt", 7]}, "allowed_models[1]", "model name"),
    ({"allowed_models": ["gpt-5-nope"]}, "allowed_models[0]", "no model 'gpt-5-nope' is configured"),
    ({"monthly_limit_tokens": -1}, "monthly_limit_tokens", "non-negative integer"),
    ({"monthly_limit_tokens": True}, "monthly_limit_tokens", "non-negative integer"),
    ({"expires_at": "next tuesday"}, "expires_at", "ISO-8601"),
    ({"expires_at": "2030-01-01T00:00:00"}, "expires_at", "timezone"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "in the past"),
    ({"expires_in": "3 fortnights"}, "expires_in", "duration"),
    ({"expires_in": "9" * 5000}, "expires_in", "duration"),  # past int()'s digit limit
    ({"expires_at": "9999-12-31T23:59:59-01:00"}, "expires_at", "out of range"),  # year 10000 in UTC
    ({"expires_in": 0}, "expires_in", "more than 0"),
    ({"expires_in": 60, "expires_at": "2030-01-01T00:00:00Z"}, "expires_in", "not both"),
    ({"name": ""}, "name", "non-empty string"),
    ({"metadata": [1]}, "metadata", "an object"),
    ({"hash": "abc"}, "hash", "unknown field"),
    ({"user_id": 5}, "user_id", "non-empty string"),
])
async def test_a_bad_key_field_is_a_400_naming_it(api: Api, body: dict[str, object], param: str,
                                                  words: str) -> None:
    r = await api.call("POST", "/keys", json=body)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"]
    assert (await api.call("GET", "/keys")).json()["data"] == []  # nothing was created


async def test_a_body_that_is_not_a_json_object_is_a_400(api: Api) -> None:
    for content in (b"{nope", b"[1, 2]", b""):
        r = await api.call("POST", "/keys", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, content
        assert "JSON" in error_of(r)["message"] or "empty" in error_of(r)["message"]


async def test_a_wildcard_model_name_may_be_allowed(api: Api) -> None:
    r = await api.call("POST", "/keys", json={"allowed_models": ["mock-anything", "gpt-test"]})
    assert r.status_code == 201 and r.json()["allowed_models"] == ["mock-anything", "gpt-test"]


async def test_unknown_ids_are_404_and_update_changes_only_what_is_given(api: Api) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        body = {"name": "x"} if method == "PATCH" else None
        r = await api.call(method, "/keys/key_doesnotexist", json=body)
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    key = (await api.call("POST", "/keys", json={"name": "a", "tier": "pro"})).json()
    r = await api.call("PATCH", f"/keys/{key['id']}", json={"name": "b", "allowed_models": ["mock-gpt"]})
    assert r.status_code == 200
    assert (r.json()["name"], r.json()["tier"], r.json()["allowed_models"]) == ("b", "pro", ["mock-gpt"])
    r = await api.call("PATCH", f"/keys/{key['id']}", json={})
    assert r.status_code == 400 and "nothing to change" in error_of(r)["message"]
    r = await api.call("PATCH", f"/keys/{key['id']}", json={"tier": None})
    assert r.status_code == 400 and error_of(r)["param"] == "tier"


async def test_key_lifecycle_through_the_api(api: Api) -> None:
    """create → use → rotate (old 401, new works) → model refused → revoke → expire."""
    created = (await api.call("POST", "/keys", json={"name": "app"})).json()
    first = created["key"]
    assert (await api.chat(first)).status_code == 200
    rotated = await api.call("POST", f"/keys/{created['id']}/rotate")
    assert rotated.status_code == 201
    second = rotated.json()["key"]
    assert second != first and rotated.json()["metadata"]["rotated_from"] == created["id"]
    assert (await api.chat(first)).status_code == 401
    assert (await api.chat(second)).status_code == 200
    old = (await api.call("GET", f"/keys/{created['id']}")).json()
    assert (old["status"], old["replaced_by"]) == ("revoked", rotated.json()["id"])
    r = await api.call("POST", f"/keys/{created['id']}/rotate")  # a revoked key cannot be rotated
    assert r.status_code == 400 and "revoked" in error_of(r)["message"]

    await api.call("PATCH", f"/keys/{rotated.json()['id']}", json={"allowed_models": ["mock-gpt"]})
    refused = await api.chat(second, model="mock-other")
    assert refused.status_code == 403 and "mock-other" in error_of(refused)["message"]
    assert (await api.chat(second, model="mock-gpt")).status_code == 200

    revoked = await api.call("DELETE", f"/keys/{rotated.json()['id']}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert (await api.chat(second)).status_code == 401

    third = (await api.call("POST", "/keys", json={"expires_in": 3600})).json()
    assert (await api.chat(third["key"])).status_code == 200
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    await api.store.update_key(third["id"], tenant=None, expires_at=past)  # time passes
    assert (await api.call("GET", f"/keys/{third['id']}")).json()["status"] == "expired"
    assert (await api.chat(third["key"])).status_code == 401


async def test_rotate_with_grace_keeps_the_old_key_working_for_a_while(api: Api) -> None:
    created = (await api.call("POST", "/keys", json={})).json()
    r = await api.call("POST", f"/keys/{created['id']}/rotate", json={"grace": "1h"})
    assert r.status_code == 201
    assert (await api.chat(created["key"])).status_code == 200
    assert (await api.chat(r.json()["key"])).status_code == 200
    old = (await api.call("GET", f"/keys/{created['id']}")).json()
    assert old["status"] == "active" and old["revoked_at"] is not None
    working = (await api.call("GET", "/keys?include_revoked=false")).json()["data"]
    assert {k["id"] for k in working} == {created["id"], r.json()["id"]}
    r = await api.call("POST", f"/keys/{r.json()['id']}/rotate", json={"grace": "soon"})
    assert r.status_code == 400 and error_of(r)["param"] == "grace"


async def test_lists_page_with_limit_and_offset(api: Api) -> None:
    ids = [(await api.call("POST", "/keys", json={"name": f"k{i}"})).json()["id"] for i in range(5)]
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = (await api.call("GET", f"/keys?limit=2&offset={offset}")).json()
        assert len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        offset = page["next_offset"]
        assert page["has_more"] == (offset is not None)
    assert seen == ids
    # "²" and "٣" pass str.isdigit(); 5000 digits is past int()'s limit: 400s, not 500s
    for bad in ("limit=0", "limit=201", "limit=x", "offset=-1", "limit=%C2%B2", "offset=%D9%A3",
                f"offset={'9' * 5000}"):
        r = await api.call("GET", f"/keys?{bad}")
        assert r.status_code == 400 and error_of(r)["param"] == bad.split("=")[0]
    await api.call("DELETE", f"/keys/{ids[0]}")
    active = (await api.call("GET", "/keys?include_revoked=false")).json()["data"]
    assert [k["id"] for k in active] == ids[1:]


# ---------------------------------------------------------------- tenants, users, providers

async def test_tenants_and_users_crud(api: Api) -> None:
    t = await api.call("POST", "/tenants", json={"name": "globex", "metadata": {"plan": "pro"}})
    assert t.status_code == 201
    tid = t.json()["id"]
    assert (await api.call("POST", "/tenants", json={"name": "globex"})).status_code == 409
    assert error_of(await api.call("POST", "/tenants", json={}))["param"] == "name"
    u = await api.call("POST", "/users", json={"tenant_id": tid, "email": "h@globex.test", "role": "admin"})
    assert u.status_code == 201
    uid = u.json()["id"]
    r = await api.call("PATCH", f"/users/{uid}", json={"name": "Hank", "role": "member"})
    assert (r.status_code, r.json()["name"], r.json()["role"]) == (200, "Hank", "member")
    assert error_of(await api.call("PATCH", f"/users/{uid}", json={"role": "boss"}))["param"] == "role"
    key = (await api.call("POST", "/keys", json={"user_id": uid})).json()
    assert key["tenant_id"] == tid  # a user's key belongs to the user's tenant
    assert (await api.call("DELETE", f"/users/{uid}")).status_code == 200
    assert (await api.call("GET", f"/keys/{key['id']}")).status_code == 404  # gone with its user
    assert (await api.call("GET", f"/users/{uid}")).status_code == 404
    assert (await api.call("DELETE", f"/tenants/{tid}")).status_code == 200
    assert (await api.call("GET", f"/tenants/{tid}")).status_code == 404
    assert (await api.call("POST", "/users", json={"tenant_id": tid})).status_code == 404


async def test_providers_lists_models_and_health_and_never_a_key(api: Api) -> None:
    r = await api.call("GET", "/providers")
    assert r.status_code == 200
    by_name = {p["name"]: p for p in r.json()["data"]}
    assert set(by_name) == {"openai", "ollama", "mock"}
    assert by_name["openai"]["models"] == ["gpt-test", "embed-test"]
    assert by_name["openai"]["status"] == "ready"
    assert by_name["openai"]["api_base"] == "https://api.openai.test/v1"
    assert "sk-upstream-secret-123" not in r.text and "api_key" not in r.text


async def test_a_provider_without_its_key_is_reported_unavailable(migrated_url: str) -> None:
    config = manage_config(migrated_url, providers={
        "openai": {"plugin": "openai", "api_base": "https://u:pw@api.openai.test/v1?token=t0k",
                   "api_key": None},
        "mock": {"plugin": "mock"}},
        models=[{"name": "gpt-test", "provider": "openai"}, {"name": "mock-*", "provider": "mock"}])
    async with manage_app(migrated_url, config) as api:
        data = {p["name"]: p for p in (await api.call("GET", "/providers")).json()["data"]}
    assert data["openai"]["status"] == "unavailable" and "api_key" in data["openai"]["detail"]
    assert data["openai"]["api_base"] == "https://api.openai.test/v1"  # no user:password, no query
    assert data["mock"]["status"] == "ready"


# ---------------------------------------------------------------- failures

async def test_a_database_that_goes_away_is_a_503_not_a_traceback(api: Api,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    dead = create_engine(f"postgresql+asyncpg://postgres:pw@127.0.0.1:{free_port()}/gone")
    api.app.state.key_store = KeyStore(dead)
    try:
        for method, path in (("GET", "/keys"), ("POST", "/tenants"), ("GET", "/users/usr_x")):
            r = await api.call(method, path, json={"name": "x"} if method == "POST" else None)
            assert r.status_code == 503, r.text
            assert error_of(r)["code"] == "database_unavailable"
            assert "Traceback" not in r.text and "asyncpg" not in r.text
    finally:
        await dead.dispose()
    assert "Traceback" not in caplog.text


async def test_without_a_database_the_routes_say_so(tmp_path: object) -> None:
    from tests.conftest import make_config
    async with manage_app("", make_config(server={"master_key": MASTER})) as api:
        r = await api.call("GET", "/keys")
        assert r.status_code == 503 and error_of(r)["code"] == "database_not_configured"
        assert (await api.call("GET", "/providers")).status_code == 200  # needs no database
