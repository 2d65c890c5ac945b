"""``/api/ai/tenants`` and ``/api/ai/users``.

Tenants: the master key creates, lists, changes and deletes any; an admin key sees
and may rename its own tenant only, and deletes none. Users: an admin key manages
the users of its own tenant; the master key those of any (``tenant_id`` in the body).
"""

from __future__ import annotations

from typing import Any

from aiproxy.builtin.manage.access import Caller, Result, body_of
from aiproxy.builtin.manage.fields import Fields, bad, page_params
from aiproxy.storage.keys import NotFound
from aiproxy.storage.pages import page_tenants, page_users, update_tenant, update_user
from aiproxy.storage.records import TenantRecord, UserRecord


def tenant_json(record: TenantRecord) -> dict[str, Any]:
    return {"object": "tenant", **record.to_dict()}


def user_json(record: UserRecord) -> dict[str, Any]:
    return {"object": "user", **record.to_dict()}


def _listing(items: list[dict[str, Any]], has_more: bool, next_offset: int | None) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more, "next_offset": next_offset}


def _path_id(caller: Caller, name: str) -> str:
    return str(caller.request.path_params[name])


# ------------------------------------------------------------------ tenants

async def list_tenants(caller: Caller) -> Result:
    caller.require_admin()
    offset, limit = page_params(caller.request.query_params)
    page = await page_tenants(caller.store, tenant=caller.scope, offset=offset, limit=limit)
    return 200, _listing([tenant_json(t) for t in page.items], page.has_more, page.next_offset)


async def create_tenant(caller: Caller) -> Result:
    caller.require_master("create tenants")
    f = Fields(await body_of(caller.request), ("name", "metadata"))
    name = f.string("name", required=True)
    assert name is not None
    return 201, tenant_json(await caller.store.create_tenant(name, metadata=f.mapping("metadata")))


async def _visible_tenant(caller: Caller) -> str:
    tenant_id = _path_id(caller, "tenant_id")
    if not caller.own_tenant(tenant_id):
        raise NotFound(f"no tenant {tenant_id!r}")
    return tenant_id


async def get_tenant(caller: Caller) -> Result:
    caller.require_admin()
    tenant_id = await _visible_tenant(caller)
    record = await caller.store.get_tenant(tenant_id)
    if record is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return 200, tenant_json(record)


async def change_tenant(caller: Caller) -> Result:
    caller.require_admin()
    tenant_id = await _visible_tenant(caller)
    f = Fields(await body_of(caller.request), ("name", "metadata"))
    if not f.body:
        raise bad("body", "nothing to change (fields: name, metadata)")
    record = await update_tenant(caller.store, tenant_id,
                                 name=f.string("name", nullable=False), metadata=f.mapping("metadata"))
    return 200, tenant_json(record)


async def delete_tenant(caller: Caller) -> Result:
    caller.require_admin()
    tenant_id = await _visible_tenant(caller)
    caller.require_master("delete a tenant")
    if not await caller.store.delete_tenant(tenant_id):
        raise NotFound(f"no tenant {tenant_id!r}")
    return 200, {"object": "tenant", "id": tenant_id, "deleted": True}


# ------------------------------------------------------------------ users

async def list_users(caller: Caller) -> Result:
    caller.require_admin()
    offset, limit = page_params(caller.request.query_params)
    page = await page_users(caller.store, tenant=caller.scope, offset=offset, limit=limit)
    return 200, _listing([user_json(u) for u in page.items], page.has_more, page.next_offset)


async def create_user(caller: Caller) -> Result:
    caller.require_admin()
    f = Fields(await body_of(caller.request), ("tenant_id", "email", "name", "role", "metadata"))
    tenant_id = f.string("tenant_id", max_len=40)
    if not caller.master:
        if tenant_id is not None and tenant_id != caller.principal.tenant:
            raise NotFound(f"no tenant {tenant_id!r}")
        tenant_id = caller.principal.tenant
    record = await caller.store.create_user(
        tenant_id=tenant_id, email=f.string("email", max_len=320), name=f.string("name"),
        role=f.role("member") or "member", metadata=f.mapping("metadata"))
    return 201, user_json(record)


async def get_user(caller: Caller) -> Result:
    caller.require_admin()
    user_id = _path_id(caller, "user_id")
    record = await caller.store.get_user(user_id, tenant=caller.scope)
    if record is None:
        raise NotFound(f"no user {user_id!r}")
    return 200, user_json(record)


async def change_user(caller: Caller) -> Result:
    caller.require_admin()
    f = Fields(await body_of(caller.request), ("email", "name", "role", "metadata"))
    changes: dict[str, Any] = {}
    for name, max_len in (("email", 320), ("name", 200)):
        if f.has(name):
            changes[name] = f.string(name, max_len=max_len)
    if f.has("role"):
        changes["role"] = f.role()
    if f.has("metadata"):
        changes["metadata"] = f.mapping("metadata")
    if not changes:
        raise bad("body", "nothing to change (fields: email, name, role, metadata)")
    record = await update_user(caller.store, _path_id(caller, "user_id"), tenant=caller.scope, **changes)
    return 200, user_json(record)


async def delete_user(caller: Caller) -> Result:
    caller.require_admin()
    user_id = _path_id(caller, "user_id")
    if not await caller.store.delete_user(user_id, tenant=caller.scope):
        raise NotFound(f"no user {user_id!r}")
    return 200, {"object": "user", "id": user_id, "deleted": True}
