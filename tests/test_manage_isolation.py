"""Tenant isolation over EVERY management route and method, on SQLite and PostgreSQL.

Tenants A and B each have an admin and a member with a key. A's admin key (and A's
member key, and an admin key of no tenant) touch each of B's keys, users and its
tenant through every route: each answer is 404 (403 for the member), carries nothing
of B, and B is the same afterwards. A's lists hold A's rows and nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.routing import Route

from aiproxy.builtin.manage import PREFIX
from tests.helpers import error_of
from tests.manage_support import Api, Tenant, make_tenant, manage_app

# (method, path, body): every route that names one of B's rows, or puts something into B
CASES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/keys/{key}", None),
    ("PATCH", "/keys/{key}", {"name": "stolen"}),
    ("DELETE", "/keys/{key}", None),
    ("POST", "/keys/{key}/rotate", None),
    ("GET", "/tenants/{tenant}", None),
    ("PATCH", "/tenants/{tenant}", {"name": "stolen"}),
    ("DELETE", "/tenants/{tenant}", None),
    ("GET", "/users/{user}", None),
    ("PATCH", "/users/{user}", {"name": "stolen"}),
    ("DELETE", "/users/{user}", None),
    ("POST", "/keys", {"user_id": "{user}"}),
    ("POST", "/keys", {"tenant_id": "{tenant}"}),
    ("POST", "/keys", {"user_id": "{admin}", "role": "admin"}),
    ("POST", "/users", {"tenant_id": "{tenant}", "email": "spy@a.test"}),
    ("GET", "/providers/openai/credentials?tenant_id={tenant}", None),
    ("PUT", "/providers/openai/credentials", {"tenant_id": "{tenant}", "api_key": "sk-spy-key-0000000"}),
    ("POST", "/providers/openai/credentials", {"tenant_id": "{tenant}", "api_key": "sk-spy-key-0000000"}),
    ("DELETE", "/providers/openai/credentials?tenant_id={tenant}", None),
    ("GET", "/usage?tenant_id={tenant}", None),  # the usage stage's route; its lists: test_usage_api
]
B_OWN_KEY = "sk-globex-own-openai-key-ZZ9876"
# routes with no id of anyone's in them: their isolation is that lists show only the caller's rows
LISTS = ["/keys", "/users", "/tenants"]
CALLERS = {"admin of A": 404, "admin of no tenant": 404, "member of A": 403}


@dataclass
class World:
    api: Api
    a: Tenant
    b: Tenant
    untenanted_admin: str


@pytest.fixture
async def world(migrated_url: str) -> AsyncIterator[World]:
    async with manage_app(migrated_url) as api:
        a = await make_tenant(api, "acme")
        b = await make_tenant(api, "globex")
        await api.call("PUT", "/providers/openai/credentials", key=b.admin_key, json={"api_key": B_OWN_KEY})
        loose = (await api.call("POST", "/keys", json={"role": "admin", "name": "ops"})).json()["key"]
        yield World(api, a, b, loose)


def _fill(value: Any, b: Tenant) -> Any:
    ids = {"{key}": b.member_key_id, "{tenant}": b.id, "{user}": b.member_user, "{admin}": b.admin_user}
    if isinstance(value, str):
        for mark, real in ids.items():
            value = value.replace(mark, real)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, b) for k, v in value.items()}
    return value


def _secrets_of(t: Tenant) -> list[str]:
    return [t.id, t.admin_user, t.member_user, t.admin_key_id, t.member_key_id, t.admin_key, t.member_key,
            t.admin_key[:11], t.member_key[:11], B_OWN_KEY, "9876"]


async def _snapshot(api: Api, b: Tenant) -> dict[str, Any]:
    """B as the master key sees it."""
    keys = (await api.call("GET", "/keys?limit=200")).json()["data"]
    users = (await api.call("GET", "/users?limit=200")).json()["data"]
    return {"tenant": (await api.call("GET", f"/tenants/{b.id}")).json(),
            "keys": [k for k in keys if k["tenant_id"] == b.id],
            "users": [u for u in users if u["tenant_id"] == b.id],
            "credential": (await api.call("GET", f"/providers/openai/credentials?tenant_id={b.id}")).json()}


@pytest.mark.parametrize(("method", "path", "body"), CASES,
                         ids=[f"{m} {p} {sorted(b or {})}" for m, p, b in CASES])
async def test_a_key_of_one_tenant_cannot_touch_another_tenants_rows(
        world: World, method: str, path: str, body: dict[str, Any] | None) -> None:
    api, a, b = world.api, world.a, world.b
    before = await _snapshot(api, b)
    target, payload = _fill(path, b), _fill(body, b)
    for caller, key in (("admin of A", a.admin_key), ("admin of no tenant", world.untenanted_admin),
                        ("member of A", a.member_key)):
        r = await api.call(method, target, key=key, json=payload)
        assert r.status_code == CALLERS[caller], (caller, r.text)
        error_of(r)
        for secret in _secrets_of(b):
            if secret not in target and secret not in str(payload):
                assert secret not in r.text, f"{caller} learned {secret!r} from {method} {path}: {r.text}"
        assert "globex" not in r.text
        assert await _snapshot(api, b) == before, f"B changed after {caller}'s {method} {path}"
    assert (await api.chat(b.member_key)).status_code == 200, "B's key stopped working"


@pytest.mark.parametrize("path", LISTS)
async def test_lists_hold_only_the_callers_tenant(world: World, path: str) -> None:
    api, a, b = world.api, world.a, world.b
    r = await api.call("GET", path, key=a.admin_key)
    assert r.status_code == 200
    rows = r.json()["data"]
    assert rows, "A sees its own rows"
    for row in rows:
        assert (row["id"] if path == "/tenants" else row["tenant_id"]) == a.id, row
    for secret in _secrets_of(b):
        assert secret not in r.text
    mine = {"/keys": {a.admin_key_id, a.member_key_id}, "/users": {a.admin_user, a.member_user},
            "/tenants": {a.id}}[path]
    assert {row["id"] for row in rows} == mine
    loose = await api.call("GET", path, key=world.untenanted_admin)
    assert all(row.get("tenant_id") is None and row["id"] != a.id for row in loose.json()["data"])
    everything = await api.call("GET", path)  # the master key sees both
    assert {a.id, b.id} <= {row["id"] if path == "/tenants" else row["tenant_id"]
                            for row in everything.json()["data"]}


async def test_filters_do_not_reach_into_another_tenant(world: World) -> None:
    api, a, b = world.api, world.a, world.b
    r = await api.call("GET", f"/keys?user_id={b.member_user}", key=a.admin_key)
    assert r.status_code == 200 and r.json()["data"] == []
    r = await api.call("GET", f"/providers/openai/credentials?tenant_id={b.id}", key=a.admin_key)
    assert r.status_code == 404 and B_OWN_KEY not in r.text
    providers = (await api.call("GET", "/providers", key=a.admin_key)).json()["data"]
    assert all(p.get("credential") is None for p in providers)  # B's key is not A's
    mine = (await api.call("GET", "/providers", key=b.admin_key)).json()["data"]
    assert [p["credential"]["fingerprint"] for p in mine if p.get("credential")] == ["…9876"]


async def test_self_is_the_callers_own_key_whoever_asks(world: World) -> None:
    for t in (world.a, world.b):
        for key, key_id in ((t.admin_key, t.admin_key_id), (t.member_key, t.member_key_id)):
            r = await world.api.call("GET", "/keys/self", key=key)
            assert r.status_code == 200 and r.json()["id"] == key_id and r.json()["tenant_id"] == t.id


async def test_admin_of_a_still_manages_a(world: World) -> None:
    """The same routes work on A's own rows: the 404s above are isolation, not breakage."""
    api, a = world.api, world.a
    await api.call("PUT", "/providers/openai/credentials", key=a.admin_key,
                   json={"api_key": "sk-acme-0wn-1234"})
    for method, path, body in sorted(CASES, key=lambda case: case[0] == "DELETE"):  # deletes last
        if path in ("/tenants/{tenant}",) and method == "DELETE":
            continue  # only the master key deletes tenants
        own = {"{key}": a.member_key_id, "{tenant}": a.id, "{user}": a.member_user,
               "{admin}": a.admin_user}
        filled_path = path
        for mark, real in own.items():
            filled_path = filled_path.replace(mark, real)
        filled_body = {k: own.get(v, v) for k, v in (body or {}).items()} if body else None
        r = await api.call(method, filled_path, key=a.admin_key, json=filled_body)
        assert r.status_code in (200, 201), (method, filled_path, r.text)


def test_every_management_route_and_method_is_in_the_matrix() -> None:
    """A route added later without an isolation case fails here."""
    from aiproxy.builtin.manage import routes as manage_routes
    from aiproxy.builtin.usage.api import routes as usage_routes

    names = {"{key}": "{key_id}", "{tenant}": "{tenant_id}", "{user}": "{user_id}", "openai": "{provider}"}
    covered = set()
    for method, path, _ in CASES:
        path = path.split("?")[0]
        for ours, route_param in names.items():
            path = path.replace(ours, route_param)
        covered.add((method, PREFIX + path))
    covered |= {("GET", PREFIX + p) for p in LISTS} | {("GET", f"{PREFIX}/keys/self"),
                                                       ("GET", f"{PREFIX}/providers"),
                                                       ("POST", f"{PREFIX}/tenants")}
    declared = {(m, r.path) for r in [*manage_routes(), *usage_routes()] if isinstance(r, Route)
                for m in (r.methods or ())
                if m != "HEAD"}
    assert declared - covered == set()
