"""Bring your own key: a tenant's own provider keys for that tenant's calls.

Before each call of a virtual key with a tenant, the tenant's provider keys are put
in ``call.credentials`` (provider name → key), and the provider sends that key
instead of its own. They come decrypted from an in-memory copy, refreshed from the
database every ``keys.cache_ttl`` seconds and at once when this replica changes
them; the plaintext is never written anywhere. Calls of other tenants, and of keys
with no tenant, use the provider's own key.

Fails closed: if a tenant's keys cannot be read (database down and nothing cached)
or decrypted (wrong ``ENCRYPTION_KEY``), its calls get 503, never the shared key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import func, select
from starlette.applications import Starlette

from aiproxy import hookimpl
from aiproxy.builtin.keys import seconds_setting
from aiproxy.call import Call
from aiproxy.config import Config
from aiproxy.errors import ProxyError
from aiproxy.singleflight import SingleFlight
from aiproxy.storage.credentials import CredentialStore
from aiproxy.storage.crypto import CryptoError
from aiproxy.storage.db import DatabaseError
from aiproxy.storage.models import ProviderCredential

log = logging.getLogger("aiproxy.tenant_keys")
_NONE: dict[str, str] = {}


class TenantKeys:
    def __init__(self, config: Config, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.ttl = seconds_setting(config.section("keys"), "cache_ttl", 30)
        self.monotonic = monotonic
        self.store: CredentialStore | None = None
        self.cache: dict[str, tuple[float, dict[str, str]]] = {}
        self._lookup: SingleFlight[str, dict[str, str]] = SingleFlight(self._fetch)
        self._generations: dict[str, int] = {}  # bumped by forget(): a lookup in flight must not re-cache

    @hookimpl
    async def aiproxy_startup(self, app: Starlette) -> None:
        store: CredentialStore | None = getattr(app.state, "credential_store", None)
        if store is None:
            return
        if store.cipher is None:
            async with store.sessions() as s:
                stored = await s.scalar(select(func.count()).select_from(ProviderCredential))
            if stored:
                log.warning("%d tenant provider key(s) are stored but ENCRYPTION_KEY is not set: "
                            "those tenants' calls get 503 until it is", stored)
        self.store = store
        store.subscribe_tenants(self.forget)

    def forget(self, tenant_id: str) -> None:
        self._generations[tenant_id] = self._generations.get(tenant_id, 0) + 1
        self.cache.pop(tenant_id, None)
        self._lookup.forget(tenant_id)  # later callers don't join a lookup that began before

    @hookimpl
    async def aiproxy_before_call(self, call: Call) -> None:
        principal = call.principal
        if self.store is None or principal is None or principal.tenant is None or principal.kind != "key":
            return
        keys = await self.keys_of(principal.tenant)
        if keys:
            call.credentials = keys  # shared and read-only: providers only read it

    async def keys_of(self, tenant_id: str) -> dict[str, str]:
        entry = self.cache.get(tenant_id)
        if entry is not None and entry[0] > self.monotonic():
            return entry[1]
        try:
            return await self._lookup(tenant_id)  # concurrent misses for one tenant share one lookup
        except DatabaseError:
            if entry is not None:
                return entry[1]  # stale beats failing while the database is away
            raise _unavailable("the key store is unavailable") from None
        except CryptoError:
            raise _unavailable("this tenant's provider keys cannot be decrypted; "
                               "the operator has been told") from None

    async def _fetch(self, tenant_id: str) -> dict[str, str]:
        generation = self._generations.get(tenant_id, 0)
        assert self.store is not None
        try:
            if self.store.cipher is None:
                keys = await self._without_cipher(tenant_id)
            else:
                keys = await self.store.for_tenant(tenant_id) or _NONE
        except CryptoError as exc:
            log.error("provider keys of tenant %s cannot be decrypted: %s", tenant_id, exc)
            raise
        if generation == self._generations.get(tenant_id, 0):  # unchanged meanwhile: current
            self.cache[tenant_id] = (self.monotonic() + self.ttl, keys)
        return keys

    async def _without_cipher(self, tenant_id: str) -> dict[str, str]:
        assert self.store is not None
        if await self.store.list(tenant_id):
            raise CryptoError("ENCRYPTION_KEY is not set")
        return _NONE


def _unavailable(why: str) -> ProxyError:
    return ProxyError(503, f"Cannot use this tenant's own provider keys: {why}.",
                      type="service_unavailable", code="service_unavailable", headers={"retry-after": "5"})


def aiproxy_plugin(config: Config) -> TenantKeys:
    return TenantKeys(config)


