"""Tenants' own provider keys (bring your own key), encrypted at rest.

Only ciphertext is stored (AES-256-GCM, see :mod:`aiproxy.storage.crypto`), bound to
its tenant and provider; the plaintext exists only in memory, in the process that
uses it. Listing shows which providers a tenant has a key for, never the key::

    creds = CredentialStore(engine, cipher)
    await creds.put("ten_…", "openai", "sk-tenant-own-key")
    await creds.for_tenant("ten_…")        # {"openai": "sk-tenant-own-key"} (in memory only)
    await creds.list("ten_…")              # [{"provider": "openai", "key_version": …, …}]
    await creds.reencrypt()                # after rotating ENCRYPTION_KEY: rows re-encrypted

Every change calls the listeners given to :meth:`subscribe` with the tenant id, so
this replica's in-memory copy is dropped at once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from aiproxy.storage.crypto import Cipher, CryptoError
from aiproxy.storage.keys import NotFound, Store, StoreError
from aiproxy.storage.models import ProviderCredential, Tenant
from aiproxy.storage.records import iso


def aad(tenant_id: str, provider: str) -> bytes:
    """What a ciphertext is bound to: it opens only in this tenant's row for this provider."""
    return f"aiproxy/provider_credentials/{tenant_id}/{provider}".encode()


class CredentialStore(Store):
    """Tenants' provider keys; ``cipher`` None (no ENCRYPTION_KEY) refuses to store or read any."""

    def __init__(self, engine: AsyncEngine, cipher: Cipher | None) -> None:
        super().__init__(engine)
        self.cipher = cipher

    def _need_cipher(self) -> Cipher:
        if self.cipher is None:
            raise StoreError("provider keys cannot be stored: set ENCRYPTION_KEY "
                             "(32 bytes, e.g. 'openssl rand -base64 32')")
        return self.cipher

    async def put(self, tenant_id: str, provider: str, api_key: str) -> dict[str, Any]:
        """Store (or replace) a tenant's key for ``provider``; returns its listing entry."""
        cipher = self._need_cipher()
        if not provider or not api_key:
            raise StoreError("a provider name and a key are required")
        sealed = cipher.encrypt(api_key, aad(tenant_id, provider))
        async with self._tx() as s:
            if await s.get(Tenant, tenant_id) is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            row = await s.scalar(select(ProviderCredential).where(
                ProviderCredential.tenant_id == tenant_id, ProviderCredential.provider == provider))
            if row is None:
                row = ProviderCredential(tenant_id=tenant_id, provider=provider, ciphertext=sealed,
                                         key_version=cipher.current_id)
                s.add(row)
            else:
                row.ciphertext, row.key_version = sealed, cipher.current_id
            await s.flush()
            entry = _entry(row)
        self._tenant_changed(tenant_id)
        return entry

    async def delete(self, tenant_id: str, provider: str) -> bool:
        async with self._tx() as s:
            row = await s.scalar(select(ProviderCredential).where(
                ProviderCredential.tenant_id == tenant_id, ProviderCredential.provider == provider))
            if row is None:
                return False
            await s.delete(row)
        self._tenant_changed(tenant_id)
        return True

    async def list(self, tenant_id: str) -> list[dict[str, Any]]:
        """Which providers the tenant has a key for: no key, no ciphertext."""
        async with self._tx() as s:
            rows = await s.scalars(select(ProviderCredential).where(ProviderCredential.tenant_id == tenant_id)
                                   .order_by(ProviderCredential.provider))
            return [_entry(r) for r in rows]

    async def for_tenant(self, tenant_id: str) -> dict[str, str]:
        """Provider → plaintext key, decrypted in memory. Raises CryptoError if a row does
        not open (wrong ENCRYPTION_KEY): a tenant's calls must not fall back to the shared key."""
        cipher = self._need_cipher()
        async with self._tx() as s:
            rows = list(await s.scalars(select(ProviderCredential)
                                        .where(ProviderCredential.tenant_id == tenant_id)))
        out: dict[str, str] = {}
        for row in rows:
            out[row.provider] = cipher.decrypt(row.ciphertext, aad(row.tenant_id, row.provider))
        return out

    async def reencrypt(self, batch: int = 200) -> int:
        """Re-encrypt every row not under the current key; returns how many changed.

        Rows are read and rewritten in batches, each in its own transaction; replicas
        keep serving meanwhile (they decrypt with either key). Raises CryptoError if a
        row was made with a key that is neither current nor previous.
        """
        cipher = self._need_cipher()
        changed = 0
        while True:
            async with self._tx() as s:
                rows = list(await s.scalars(
                    select(ProviderCredential).where(ProviderCredential.key_version != cipher.current_id)
                    .order_by(ProviderCredential.id).limit(batch).with_for_update()))
                for row in rows:
                    where = aad(row.tenant_id, row.provider)
                    try:
                        plaintext = cipher.decrypt(row.ciphertext, where)
                    except CryptoError as exc:
                        raise CryptoError(f"provider key of tenant {row.tenant_id} for {row.provider}: "
                                          f"{exc}") from None
                    row.ciphertext, row.key_version = cipher.encrypt(plaintext, where), cipher.current_id
                tenants = {row.tenant_id for row in rows}
            changed += len(rows)
            for tenant_id in tenants:
                self._tenant_changed(tenant_id)
            if len(rows) < batch:
                return changed


def _entry(row: ProviderCredential) -> dict[str, Any]:
    return {"tenant_id": row.tenant_id, "provider": row.provider, "key_version": row.key_version,
            "created_at": iso(row.created_at), "updated_at": iso(row.updated_at)}
