"""What the store hands out: plain frozen records, detached from any session.

A record never holds a secret: a key's record has its ``prefix`` (``sk-AbCdEfGh…``,
for people to tell keys apart) but neither the key nor its hash.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from aiproxy.storage.models import ApiKey, Tenant, User


def iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: str
    name: str
    created_at: dt.datetime
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Tenant) -> TenantRecord:
        return cls(row.id, row.name, row.created_at, dict(row.meta or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created_at": iso(self.created_at),
                "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: str
    tenant_id: str | None
    email: str | None
    name: str | None
    role: str
    created_at: dt.datetime
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: User) -> UserRecord:
        return cls(row.id, row.tenant_id, row.email, row.name, row.role, row.created_at,
                   dict(row.meta or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tenant_id": self.tenant_id, "email": self.email, "name": self.name,
                "role": self.role, "created_at": iso(self.created_at), "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    prefix: str
    name: str | None
    user_id: str | None
    tenant_id: str | None
    tier: str
    role: str
    allowed_models: tuple[str, ...] | None
    monthly_limit_tokens: int | None
    current_usage: int
    usage_period: str | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    replaced_by: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: ApiKey) -> KeyRecord:
        models = tuple(row.allowed_models) if row.allowed_models is not None else None
        return cls(row.id, row.prefix, row.name, row.user_id, row.tenant_id, row.tier, row.role,
                   models, row.monthly_limit_tokens, row.current_usage, row.usage_period,
                   row.expires_at, row.revoked_at, row.replaced_by, row.created_at, row.last_used_at,
                   dict(row.meta or {}))

    def status(self, now: dt.datetime) -> str:
        """``active``, ``revoked`` or ``expired`` at ``now`` (a rotated key with a grace
        period is active until its ``revoked_at``)."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    @property
    def display(self) -> str:
        """How a key is shown once created: ``sk-AbCdEfGh…``."""
        return f"sk-{self.prefix}…"

    def to_dict(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """JSON-ready, for the management API and the CLI; no secret in it."""
        return {
            "id": self.id, "prefix": self.display, "name": self.name, "user_id": self.user_id,
            "tenant_id": self.tenant_id, "tier": self.tier, "role": self.role,
            "allowed_models": list(self.allowed_models) if self.allowed_models is not None else None,
            "monthly_limit_tokens": self.monthly_limit_tokens, "current_usage": self.current_usage,
            "usage_period": self.usage_period, "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at), "replaced_by": self.replaced_by,
            "created_at": iso(self.created_at), "last_used_at": iso(self.last_used_at),
            "status": self.status(now or dt.datetime.now(dt.UTC)), "metadata": self.metadata,
        }
