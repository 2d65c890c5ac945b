"""The store API for virtual keys, tenants and users.

Virtual keys are ``sk-`` + 43 characters of ``secrets.token_urlsafe(32)``: 256 random
bits. Only two things about a key are stored: ``prefix`` (its first 8 characters
after ``sk-``, so people can tell keys apart) and ``hash``, the SHA-256 hex digest
of the whole key. A fast hash is the right one here: bcrypt/argon2 are slow on
purpose so that guessing a *low-entropy password* from its hash is costly, but
nobody can enumerate 2**256 keys at any speed, and the hot path needs a lookup
that costs microseconds, not 100 ms. The plaintext is returned once, by
:meth:`KeyStore.create_key` / :meth:`KeyStore.rotate_key`, and never again.

Tenant scoping: every read or change of a key or user takes a keyword-only
``tenant``: a tenant id (only that tenant's rows), ``None`` (rows of no tenant, the
gateway's own), or :data:`ALL_TENANTS` (the master key's view). It has no default,
so a caller cannot forget it. A row of another tenant is reported exactly as a row
that does not exist (``None`` / :class:`NotFound`), so ids of other tenants leak
nothing.

Usage::

    store = KeyStore(engine)                    # engine: aiproxy.storage.db.create_engine(url)
    tenant = await store.create_tenant("acme")
    user = await store.create_user(tenant_id=tenant.id, email="ann@acme.test", role="admin")
    secret, key = await store.create_key(user_id=user.id, tier="pro", allowed_models=["gpt-4o"])
    await store.list_keys(tenant=tenant.id)     # [KeyRecord(...)]
    secret2, key2 = await store.rotate_key(key.id, tenant=tenant.id, grace=dt.timedelta(hours=1))
    await store.revoke_key(key2.id, tenant=tenant.id)
    await store.lookup_by_hash(hash_key(secret2))   # the record, now with revoked_at set

Each change to a key (revoke, rotate, update, delete, and the deletes that cascade
to keys) calls the listeners given to :meth:`KeyStore.subscribe` with the key ids,
so this replica's auth cache drops them at once. Database failures surface as
:class:`~aiproxy.storage.db.DatabaseUnavailable`; bad input as :class:`StoreError`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

from sqlalchemy import Select, or_, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from aiproxy.storage.db import DatabaseUnavailable, session_factory
from aiproxy.storage.models import ApiKey, Tenant, User, utcnow
from aiproxy.storage.names import ROLES, TIERS
from aiproxy.storage.records import KeyRecord, TenantRecord, UserRecord

KEY_PREFIX: Final = "sk-"
PREFIX_CHARS: Final = 8
KEY_LENGTH: Final = len(KEY_PREFIX) + 43


class _AllTenants:
    def __repr__(self) -> str:
        return "ALL_TENANTS"


#: the ``tenant=`` of a caller who may see every tenant (the master key)
ALL_TENANTS: Final = _AllTenants()
Scope = str | None | _AllTenants
Listener = Callable[[Sequence[str]], None]


class StoreError(Exception):
    """A request the store refuses; the message says why (for a 400/409)."""


class NotFound(StoreError):
    """No such row, or not in the caller's tenant (the two look the same)."""


class Conflict(StoreError):
    """The row would clash with one that exists (a tenant name taken, …)."""


def generate_key() -> str:
    """A new virtual key: ``sk-`` and 256 bits from the OS's cryptographic RNG."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """SHA-256 hex of the whole key: what is stored and looked up (see module docstring)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    return key[len(KEY_PREFIX):len(KEY_PREFIX) + PREFIX_CHARS]


def _check(value: str, allowed: Iterable[str], what: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise StoreError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _models(value: Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise StoreError("allowed_models must be a list of model names, not one string")
    models = [str(m) for m in value]
    if any(not m for m in models):
        raise StoreError("allowed_models must not contain an empty name")
    return models


def _scoped(query: Select[Any], column: Any, tenant: Scope) -> Select[Any]:
    if isinstance(tenant, _AllTenants):
        return query
    return query.where(column.is_(None) if tenant is None else column == tenant)


def _in_scope(row_tenant: str | None, tenant: Scope) -> bool:
    return isinstance(tenant, _AllTenants) or row_tenant == tenant


class Store:
    """Sessions on one engine, and one transaction helper that maps database failures."""

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.engine = engine
        self.sessions = session_factory(engine)
        self.clock = clock
        self._tenant_listeners: list[Callable[[str], None]] = []

    def subscribe_tenants(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(tenant_id)`` after a change to that tenant's rows (cache invalidation)."""
        self._tenant_listeners.append(listener)

    def _tenant_changed(self, tenant_id: str) -> None:
        for listener in self._tenant_listeners:
            listener(tenant_id)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncSession]:
        """One transaction; connection failures become DatabaseUnavailable."""
        try:
            async with self.sessions() as session, session.begin():
                yield session
        except IntegrityError as exc:
            raise Conflict(f"conflicts with an existing row: {exc.orig}") from None
        except (OperationalError, InterfaceError, OSError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"the database is unavailable ({type(exc).__name__})") from exc


class KeyStore(Store):
    """Keys, tenants and users in the database behind ``engine`` (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], dt.datetime] = utcnow) -> None:
        super().__init__(engine, clock=clock)
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(key_ids)`` after every change to those keys (cache invalidation)."""
        self._listeners.append(listener)

    def _changed(self, key_ids: Sequence[str]) -> None:
        if key_ids:
            for listener in self._listeners:
                listener(key_ids)

    # ------------------------------------------------------------ tenants
    async def create_tenant(self, name: str, *, metadata: dict[str, Any] | None = None) -> TenantRecord:
        if not name or not name.strip():
            raise StoreError("a tenant needs a name")
        async with self._tx() as s:
            row = Tenant(name=name.strip(), meta=metadata or {}, created_at=self.clock())
            s.add(row)
            await s.flush()
            return TenantRecord.of(row)

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        async with self._tx() as s:
            row = await s.get(Tenant, tenant_id)
            return TenantRecord.of(row) if row else None

    async def list_tenants(self) -> list[TenantRecord]:
        async with self._tx() as s:
            rows = await s.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id))
            return [TenantRecord.of(r) for r in rows]

    async def delete_tenant(self, tenant_id: str) -> bool:
        """Delete a tenant and everything it owns (users, keys, credentials, …)."""
        async with self._tx() as s:
            row = await s.get(Tenant, tenant_id)
            if row is None:
                return False
            ids = list(await s.scalars(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id)))
            await s.delete(row)
        self._changed(ids)
        self._tenant_changed(tenant_id)  # its provider credentials went too
        return True

    # ------------------------------------------------------------ users
    async def create_user(self, *, tenant_id: str | None = None, email: str | None = None,
                          name: str | None = None, role: str = "member",
                          metadata: dict[str, Any] | None = None) -> UserRecord:
        _check(role, ROLES, "role")
        async with self._tx() as s:
            if tenant_id is not None and await s.get(Tenant, tenant_id) is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            row = User(tenant_id=tenant_id, email=email, name=name, role=role, meta=metadata or {},
                       created_at=self.clock())
            s.add(row)
            await s.flush()
            return UserRecord.of(row)

    async def get_user(self, user_id: str, *, tenant: Scope) -> UserRecord | None:
        async with self._tx() as s:
            row = await s.get(User, user_id)
            return UserRecord.of(row) if row and _in_scope(row.tenant_id, tenant) else None

    async def list_users(self, *, tenant: Scope) -> list[UserRecord]:
        async with self._tx() as s:
            rows = await s.scalars(_scoped(select(User), User.tenant_id, tenant)
                                   .order_by(User.created_at, User.id))
            return [UserRecord.of(r) for r in rows]

    async def delete_user(self, user_id: str, *, tenant: Scope) -> bool:
        """Delete a user and their keys."""
        async with self._tx() as s:
            row = await s.get(User, user_id)
            if row is None or not _in_scope(row.tenant_id, tenant):
                return False
            ids = list(await s.scalars(select(ApiKey.id).where(ApiKey.user_id == user_id)))
            await s.delete(row)
        self._changed(ids)
        return True

    # ------------------------------------------------------------ keys
    async def create_key(self, *, user_id: str | None = None, tenant_id: str | None = None,
                         name: str | None = None, tier: str = "free", role: str = "member",
                         allowed_models: Iterable[str] | None = None,
                         monthly_limit_tokens: int | None = None, expires_at: dt.datetime | None = None,
                         metadata: dict[str, Any] | None = None) -> tuple[str, KeyRecord]:
        """A new key: ``(plaintext, record)``. Show the plaintext once; it is not kept.

        With ``user_id``, the key belongs to that user and to the user's tenant;
        ``tenant_id``, when also given, must be that tenant.
        """
        _check(tier, TIERS, "tier")
        _check(role, ROLES, "role")
        models = _models(allowed_models)
        if monthly_limit_tokens is not None and monthly_limit_tokens < 0:
            raise StoreError("monthly_limit_tokens must be at least 0")
        if expires_at is not None and expires_at.tzinfo is None:
            raise StoreError("expires_at must be timezone-aware")
        async with self._tx() as s:
            if user_id is not None:
                user = await s.get(User, user_id)
                if user is None or (tenant_id is not None and user.tenant_id != tenant_id):
                    where = f" in tenant {tenant_id!r}" if tenant_id else ""
                    raise NotFound(f"no user {user_id!r}{where}")
                tenant_id = user.tenant_id
            elif tenant_id is not None and await s.get(Tenant, tenant_id) is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            secret = generate_key()
            row = ApiKey(prefix=key_prefix(secret), hash=hash_key(secret), name=name, user_id=user_id,
                         tenant_id=tenant_id, tier=tier, role=role, allowed_models=models,
                         monthly_limit_tokens=monthly_limit_tokens, current_usage=0,
                         expires_at=expires_at, meta=metadata or {}, created_at=self.clock())
            s.add(row)
            await s.flush()
            return secret, KeyRecord.of(row)

    async def get_key(self, key_id: str, *, tenant: Scope) -> KeyRecord | None:
        async with self._tx() as s:
            row = await s.get(ApiKey, key_id)
            return KeyRecord.of(row) if row and _in_scope(row.tenant_id, tenant) else None

    async def list_keys(self, *, tenant: Scope, user_id: str | None = None,
                        include_revoked: bool = True) -> list[KeyRecord]:
        query = _scoped(select(ApiKey), ApiKey.tenant_id, tenant)
        if user_id is not None:
            query = query.where(ApiKey.user_id == user_id)
        if not include_revoked:  # a rotated key in its grace period still counts as live
            query = query.where(or_(ApiKey.revoked_at.is_(None), ApiKey.revoked_at > self.clock()))
        async with self._tx() as s:
            rows = await s.scalars(query.order_by(ApiKey.created_at, ApiKey.id))
            return [KeyRecord.of(r) for r in rows]

    async def lookup_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key whose SHA-256 hex is ``key_hash`` (revoked and expired ones included:
        the caller says which it is)."""
        async with self._tx() as s:
            row = await s.scalar(select(ApiKey).where(ApiKey.hash == key_hash))
            return KeyRecord.of(row) if row else None

    async def revoke_key(self, key_id: str, *, tenant: Scope) -> KeyRecord:
        """Revoke now (a key already revoked keeps its first ``revoked_at``)."""
        now = self.clock()
        async with self._tx() as s:
            row = await self._row(s, key_id, tenant)
            if row.revoked_at is None or row.revoked_at > now:
                row.revoked_at = now
            record = KeyRecord.of(row)
        self._changed([key_id])
        return record

    async def rotate_key(self, key_id: str, *, tenant: Scope,
                         grace: dt.timedelta = dt.timedelta(0)) -> tuple[str, KeyRecord]:
        """A new secret with the same owner, tier, models and limits: ``(plaintext, record)``.

        The old key is revoked at once, or after ``grace`` so clients can switch over.
        A revoked key cannot be rotated.
        """
        now = self.clock()
        if grace < dt.timedelta(0):
            raise StoreError("grace must not be negative")
        async with self._tx() as s:
            old = await self._row(s, key_id, tenant)
            if old.revoked_at is not None and old.revoked_at <= now:
                raise StoreError(f"key {key_id!r} is revoked; create a new one instead")
            secret = generate_key()
            new = ApiKey(prefix=key_prefix(secret), hash=hash_key(secret), name=old.name,
                         user_id=old.user_id, tenant_id=old.tenant_id, tier=old.tier, role=old.role,
                         allowed_models=old.allowed_models, monthly_limit_tokens=old.monthly_limit_tokens,
                         current_usage=old.current_usage, usage_period=old.usage_period,
                         expires_at=old.expires_at, meta={**(old.meta or {}), "rotated_from": old.id},
                         created_at=now)
            s.add(new)
            await s.flush()
            old.revoked_at = now + grace
            old.replaced_by = new.id
            record = KeyRecord.of(new)
        self._changed([key_id])
        return secret, record

    _UPDATABLE = ("name", "tier", "role", "allowed_models", "monthly_limit_tokens", "expires_at",
                  "metadata")

    async def update_key(self, key_id: str, *, tenant: Scope, **changes: Any) -> KeyRecord:
        """Change a key's ``name``, ``tier``, ``role``, ``allowed_models``,
        ``monthly_limit_tokens``, ``expires_at`` or ``metadata``."""
        unknown = set(changes) - set(self._UPDATABLE)
        if unknown:
            raise StoreError(f"cannot change {', '.join(sorted(unknown))} of a key")
        if "tier" in changes:
            _check(changes["tier"], TIERS, "tier")
        if "role" in changes:
            _check(changes["role"], ROLES, "role")
        if "allowed_models" in changes:
            changes["allowed_models"] = _models(changes["allowed_models"])
        if "metadata" in changes:
            changes["meta"] = changes.pop("metadata") or {}
        when = changes.get("expires_at")
        if when is not None and (not isinstance(when, dt.datetime) or when.tzinfo is None):
            raise StoreError("expires_at must be a timezone-aware datetime")
        if (changes.get("monthly_limit_tokens") or 0) < 0:
            raise StoreError("monthly_limit_tokens must be at least 0")
        async with self._tx() as s:
            row = await self._row(s, key_id, tenant)
            for field_name, value in changes.items():
                setattr(row, field_name, value)
            await s.flush()
            record = KeyRecord.of(row)
        self._changed([key_id])
        return record

    async def delete_key(self, key_id: str, *, tenant: Scope) -> bool:
        async with self._tx() as s:
            row = await s.get(ApiKey, key_id)
            if row is None or not _in_scope(row.tenant_id, tenant):
                return False
            await s.delete(row)
        self._changed([key_id])
        return True

    async def touch(self, last_used: dict[str, dt.datetime]) -> None:
        """Record ``last_used_at`` for many keys in one transaction (the auth stage's
        periodic flush; never on the request path)."""
        if not last_used:
            return
        async with self._tx() as s:
            for key_id, when in last_used.items():
                await s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when))

    async def _row(self, s: AsyncSession, key_id: str, tenant: Scope) -> ApiKey:
        row = await s.get(ApiKey, key_id)
        if row is None or not _in_scope(row.tenant_id, tenant):
            raise NotFound(f"no key {key_id!r}")
        return row

