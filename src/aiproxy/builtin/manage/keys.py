"""``/api/ai/keys``: list, create (the plaintext once), read, change, revoke, rotate.

An admin key works inside its own tenant: the keys it creates belong to it, and the
user it names must be one of its users. ``GET /api/ai/keys/self`` is open to every
virtual key: its own record, nothing else.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiproxy.builtin.manage.access import Caller, Result, body_of
from aiproxy.builtin.manage.fields import Fields, bad, flag, page_params, parse_duration
from aiproxy.errors import ProxyError
from aiproxy.storage.keys import NotFound
from aiproxy.storage.names import TIERS
from aiproxy.storage.pages import page_keys
from aiproxy.storage.records import KeyRecord

CREATE_FIELDS = ("user_id", "tenant_id", "name", "tier", "role", "allowed_models",
                 "monthly_limit_tokens", "expires_at", "expires_in", "metadata")
PATCH_FIELDS = ("name", "tier", "role", "allowed_models", "monthly_limit_tokens", "expires_at",
                "expires_in", "metadata")


def _within_own(caller: Caller, values: dict[str, Any], old_metadata: dict[str, Any] | None = None) -> None:
    """What a tenant's admin key gives a key stays within what it has itself: a tier no
    higher than its own, a monthly token limit no larger than its own (none only if it has
    none), and no ``metadata.rate_limits`` (set by the master key; kept when an admin
    replaces the metadata). Otherwise a tenant could lift its own tier limits, plan,
    budgets and quota. The master key sets anything."""
    if caller.master:
        return
    own = caller.principal
    tier = values.get("tier")
    if tier is not None and TIERS.index(tier) > TIERS.index(own.tier if own.tier in TIERS else "free"):
        raise ProxyError(403, f"This key may not give a key the tier {tier!r}, above its own "
                         f"({own.tier or 'free'!r}); only the master key may.", param="tier",
                         code="insufficient_permissions")
    own_limit = own.metadata.get("monthly_limit_tokens")
    if "monthly_limit_tokens" in values and isinstance(own_limit, int):
        limit = values["monthly_limit_tokens"]
        if limit is None or limit > own_limit:
            raise ProxyError(403, f"This key may not give a key a monthly_limit_tokens above its own "
                             f"({own_limit}); only the master key may.", param="monthly_limit_tokens",
                             code="insufficient_permissions")
    metadata = values.get("metadata")
    if isinstance(metadata, dict):
        if "rate_limits" in metadata:
            raise ProxyError(403, "Only the master key may set metadata.rate_limits.",
                             param="metadata.rate_limits", code="insufficient_permissions")
        if old_metadata and "rate_limits" in old_metadata:
            metadata["rate_limits"] = old_metadata["rate_limits"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def key_json(record: KeyRecord, secret: str | None = None) -> dict[str, Any]:
    data = {"object": "api_key", **record.to_dict(_now())}
    if secret is not None:
        data["key"] = secret  # shown once, in the answer to create or rotate
    return data


def _configured(caller: Caller) -> list[str]:
    return [m.name for m in caller.request.app.state.config.models]


def _key_id(caller: Caller) -> str:
    return str(caller.request.path_params["key_id"])


async def list_keys(caller: Caller) -> Result:
    caller.require_admin()
    query = caller.request.query_params
    offset, limit = page_params(query)
    page = await page_keys(caller.store, tenant=caller.scope, offset=offset, limit=limit,
                           user_id=query.get("user_id") or None,
                           include_revoked=flag(query, "include_revoked", True))
    return 200, {"object": "list", "data": [key_json(k) for k in page.items],
                 "has_more": page.has_more, "next_offset": page.next_offset}


async def create_key(caller: Caller) -> Result:
    caller.require_admin()
    f = Fields(await body_of(caller.request), CREATE_FIELDS)
    user_id = f.string("user_id", max_len=40)
    tenant_id = f.string("tenant_id", max_len=40)
    fields: dict[str, Any] = dict(
        name=f.string("name"), tier=f.tier("free"), role=f.role("member"),
        allowed_models=f.models("allowed_models", _configured(caller)),
        monthly_limit_tokens=f.count("monthly_limit_tokens"), expires_at=f.expiry(_now()),
        metadata=f.mapping("metadata"))
    store = caller.store
    if not caller.master:
        if tenant_id is not None and tenant_id != caller.principal.tenant:
            raise NotFound(f"no tenant {tenant_id!r}")
        tenant_id = caller.principal.tenant
        # the store would give a key the tenant of its user: check the user is ours first
        if user_id is not None and await store.get_user(user_id, tenant=caller.scope) is None:
            raise NotFound(f"no user {user_id!r}")
        own_limit = caller.principal.metadata.get("monthly_limit_tokens")
        if not f.has("monthly_limit_tokens") and isinstance(own_limit, int):
            fields["monthly_limit_tokens"] = own_limit  # a capped admin's keys share its cap
        _within_own(caller, fields)
    secret, record = await store.create_key(user_id=user_id, tenant_id=tenant_id, **fields)
    return 201, key_json(record, secret)


async def get_self(caller: Caller) -> Result:
    principal = caller.principal
    if principal.kind != "key":
        raise ProxyError(404, "The caller's key is not a stored virtual key (the master key has no "
                         "record).", code="not_found")
    key_id = principal.id  # never the key's metadata: whoever made the key wrote that
    record = await caller.store.get_key(key_id, tenant=principal.tenant)
    if record is None:
        raise NotFound(f"no key {key_id!r}")
    return 200, key_json(record)


async def get_key(caller: Caller) -> Result:
    caller.require_admin()
    record = await caller.store.get_key(_key_id(caller), tenant=caller.scope)
    if record is None:
        raise NotFound(f"no key {_key_id(caller)!r}")
    return 200, key_json(record)


async def update_key(caller: Caller) -> Result:
    caller.require_admin()
    f = Fields(await body_of(caller.request), PATCH_FIELDS)
    changes: dict[str, Any] = {}
    if f.has("name"):
        changes["name"] = f.string("name")
    if f.has("tier"):
        changes["tier"] = f.tier()
    if f.has("role"):
        changes["role"] = f.role()
    if f.has("allowed_models"):
        changes["allowed_models"] = f.models("allowed_models", _configured(caller))
    if f.has("monthly_limit_tokens"):
        changes["monthly_limit_tokens"] = f.count("monthly_limit_tokens")
    if f.has("expires_at") or f.has("expires_in"):
        changes["expires_at"] = f.expiry(_now())
    if f.has("metadata"):
        changes["metadata"] = f.mapping("metadata")
    if not changes:
        raise bad("body", f"nothing to change (fields: {', '.join(PATCH_FIELDS)})")
    if not caller.master:
        old = await caller.store.get_key(_key_id(caller), tenant=caller.scope)
        if old is None:
            raise NotFound(f"no key {_key_id(caller)!r}")
        _within_own(caller, changes, old.metadata)
    record = await caller.store.update_key(_key_id(caller), tenant=caller.scope, **changes)
    return 200, key_json(record)


async def revoke_key(caller: Caller) -> Result:
    caller.require_admin()
    record = await caller.store.revoke_key(_key_id(caller), tenant=caller.scope)
    return 200, key_json(record)


async def rotate_key(caller: Caller) -> Result:
    """A new secret for the key; the old one stops at once, or after ``grace``."""
    caller.require_admin()
    f = Fields(await body_of(caller.request, optional=True), ("grace",))
    grace = parse_duration(f.body["grace"], "grace") if f.body.get("grace") is not None \
        else dt.timedelta(0)
    secret, record = await caller.store.rotate_key(_key_id(caller), tenant=caller.scope, grace=grace)
    return 201, key_json(record, secret)
