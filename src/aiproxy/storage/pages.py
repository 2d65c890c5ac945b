"""What the management API needs beyond :class:`~aiproxy.storage.keys.KeyStore`:
bounded, tenant-scoped pages of keys, users and tenants, and changes to a tenant
or a user.

Small functions over a store (its engine and transaction helper), so the store API
stays as it is. Scoping follows the store's rule exactly: ``tenant=`` is a tenant
id, ``None`` (rows of no tenant) or :data:`~aiproxy.storage.keys.ALL_TENANTS`, and a
row of another tenant reads as a row that does not exist.

Pages are ``offset`` / ``limit`` over a stable order (``created_at``, then ``id``);
:func:`page` fetches one row more than asked to tell whether there are more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import false, or_, select

from aiproxy.storage.keys import KeyStore, NotFound, Scope, StoreError, _AllTenants, _in_scope, _scoped
from aiproxy.storage.models import ApiKey, Tenant, User
from aiproxy.storage.names import ROLES
from aiproxy.storage.records import KeyRecord, TenantRecord, UserRecord

MAX_LIMIT = 200
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Page(Generic[R]):
    items: list[R]
    offset: int
    has_more: bool

    @property
    def next_offset(self) -> int | None:
        return self.offset + len(self.items) if self.has_more else None


def _bounds(offset: int, limit: int) -> tuple[int, int]:
    if offset < 0:
        raise StoreError("offset must be at least 0")
    if not 1 <= limit <= MAX_LIMIT:
        raise StoreError(f"limit must be between 1 and {MAX_LIMIT}")
    return offset, limit


async def page_keys(store: KeyStore, *, tenant: Scope, offset: int = 0, limit: int = 50,
                    user_id: str | None = None, include_revoked: bool = True) -> Page[KeyRecord]:
    offset, limit = _bounds(offset, limit)
    query = _scoped(select(ApiKey), ApiKey.tenant_id, tenant)
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    if not include_revoked:  # a key rotated with a grace period works until its revoked_at
        query = query.where(or_(ApiKey.revoked_at.is_(None), ApiKey.revoked_at > store.clock()))
    query = query.order_by(ApiKey.created_at, ApiKey.id).offset(offset).limit(limit + 1)
    async with store._tx() as s:
        rows = [KeyRecord.of(r) for r in await s.scalars(query)]
    return Page(rows[:limit], offset, len(rows) > limit)


async def page_users(store: KeyStore, *, tenant: Scope, offset: int = 0,
                     limit: int = 50) -> Page[UserRecord]:
    offset, limit = _bounds(offset, limit)
    query = (_scoped(select(User), User.tenant_id, tenant)
             .order_by(User.created_at, User.id).offset(offset).limit(limit + 1))
    async with store._tx() as s:
        rows = [UserRecord.of(r) for r in await s.scalars(query)]
    return Page(rows[:limit], offset, len(rows) > limit)


async def page_tenants(store: KeyStore, *, tenant: Scope, offset: int = 0,
                       limit: int = 50) -> Page[TenantRecord]:
    """Every tenant for ``ALL_TENANTS``; else only that one (none for ``None``)."""
    offset, limit = _bounds(offset, limit)
    query = select(Tenant)
    if not isinstance(tenant, _AllTenants):
        query = query.where(Tenant.id == tenant) if tenant is not None else query.where(false())
    query = query.order_by(Tenant.created_at, Tenant.id).offset(offset).limit(limit + 1)
    async with store._tx() as s:
        rows = [TenantRecord.of(r) for r in await s.scalars(query)]
    return Page(rows[:limit], offset, len(rows) > limit)


async def update_tenant(store: KeyStore, tenant_id: str, *, name: str | None = None,
                        metadata: dict[str, Any] | None = None) -> TenantRecord:
    """Rename a tenant or replace its metadata; :class:`NotFound` when there is none."""
    if name is not None and not name.strip():
        raise StoreError("a tenant needs a name")
    async with store._tx() as s:
        row = await s.get(Tenant, tenant_id)
        if row is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        if name is not None:
            row.name = name.strip()
        if metadata is not None:
            row.meta = metadata
        await s.flush()
        return TenantRecord.of(row)


_USER_FIELDS = ("email", "name", "role", "metadata")


async def update_user(store: KeyStore, user_id: str, *, tenant: Scope, **changes: Any) -> UserRecord:
    """Change a user's ``email``, ``name``, ``role`` or ``metadata`` (not its tenant)."""
    unknown = set(changes) - set(_USER_FIELDS)
    if unknown:
        raise StoreError(f"cannot change {', '.join(sorted(unknown))} of a user")
    if "role" in changes and changes["role"] not in ROLES:
        raise StoreError(f"role must be one of {', '.join(ROLES)}, got {changes['role']!r}")
    if "metadata" in changes:
        changes["meta"] = changes.pop("metadata") or {}
    async with store._tx() as s:
        row = await s.get(User, user_id)
        if row is None or not _in_scope(row.tenant_id, tenant):
            raise NotFound(f"no user {user_id!r}")
        for field_name, value in changes.items():
            setattr(row, field_name, value)
        await s.flush()
        return UserRecord.of(row)
