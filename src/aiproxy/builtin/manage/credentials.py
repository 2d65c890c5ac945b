"""``/api/ai/providers/{name}/credentials``: a tenant's own key for a provider (BYOK).

``PUT`` (or ``POST``) ``{"api_key": "…"}`` stores it encrypted (AES-256-GCM, bound to
the tenant and provider; see :mod:`aiproxy.storage.credentials`); ``GET`` shows that
one is set, ``DELETE`` removes it. No answer holds the key: only ``fingerprint``
(``…`` and its last 4 characters), ``key_version`` and the timestamps.

An admin key works on its own tenant's keys; the master key names the tenant with
``tenant_id`` (query string or body). Another tenant's key reads as no key (404).
"""

from __future__ import annotations

from typing import Any

from aiproxy.builtin.manage.access import Caller, Result, body_of
from aiproxy.builtin.manage.fields import Fields, bad
from aiproxy.errors import ProxyError
from aiproxy.storage.credentials import CredentialStore
from aiproxy.storage.crypto import CryptoError
from aiproxy.storage.keys import NotFound

MAX_KEY = 4096


def fingerprint(secret: str) -> str:
    return f"…{secret[-4:]}" if len(secret) >= 12 else "…"


def _credentials(caller: Caller) -> CredentialStore:
    store: CredentialStore | None = getattr(caller.request.app.state, "credential_store", None)
    if store is None:
        raise ProxyError(503, "Provider keys need a database: set database.url in the config.",
                         code="database_not_configured")
    return store


def _provider(caller: Caller) -> str:
    name = str(caller.request.path_params["provider"])
    if name not in caller.request.app.state.config.providers:
        raise NotFound(f"no provider {name!r}")
    return name


def _tenant(caller: Caller, body: dict[str, Any]) -> str:
    """The tenant whose key this is: the admin's own, or the master key's ``tenant_id``."""
    given = body.get("tenant_id", caller.request.query_params.get("tenant_id"))
    if given is not None and not isinstance(given, str):
        raise bad("tenant_id", "expected a tenant id")
    if caller.master:
        if not given:
            raise bad("tenant_id", "the master key must name the tenant (tenant_id)")
        return given
    own = caller.principal.tenant
    if given is not None and given != own:
        raise NotFound(f"no tenant {given!r}")
    if own is None:
        raise bad("tenant_id", "this key belongs to no tenant, and provider keys belong to tenants")
    return own


async def credentials_of(store: CredentialStore, tenant_id: str) -> dict[str, dict[str, Any]]:
    """A tenant's provider keys by provider: listing entries with fingerprints, no key.

    The keys are decrypted in memory for their last 4 characters; one that does not
    open (a wrong ENCRYPTION_KEY) is listed with ``fingerprint: null, readable: false``.
    """
    entries = await store.list(tenant_id)
    if not entries:
        return {}
    try:
        secrets = await store.for_tenant(tenant_id) if store.cipher else None
    except CryptoError:
        secrets = None
    return {e["provider"]: {"object": "provider_credential", **e,
                            "fingerprint": fingerprint(secrets[e["provider"]]) if secrets else None,
                            "readable": secrets is not None}
            for e in entries}


async def get_credential(caller: Caller) -> Result:
    caller.require_admin()
    provider, tenant_id = _provider(caller), _tenant(caller, {})
    entry = (await credentials_of(_credentials(caller), tenant_id)).get(provider)
    if entry is None:
        raise NotFound(f"no key for provider {provider!r}")
    return 200, entry


async def put_credential(caller: Caller) -> Result:
    caller.require_admin()
    provider = _provider(caller)
    f = Fields(await body_of(caller.request), ("api_key", "tenant_id"))
    tenant_id = _tenant(caller, dict(f.body))
    secret = f.string("api_key", required=True, max_len=MAX_KEY)
    assert secret is not None
    store = _credentials(caller)
    if store.cipher is None:
        raise ProxyError(503, "Provider keys cannot be stored: the operator has not set ENCRYPTION_KEY "
                         "(security.encryption_key).", code="encryption_not_configured")
    entry = await store.put(tenant_id, provider, secret)
    return 200, {"object": "provider_credential", **entry, "fingerprint": fingerprint(secret),
                 "readable": True}


async def delete_credential(caller: Caller) -> Result:
    caller.require_admin()
    provider, tenant_id = _provider(caller), _tenant(caller, {})
    if not await _credentials(caller).delete(tenant_id, provider):
        raise NotFound(f"no key for provider {provider!r}")
    return 200, {"object": "provider_credential", "tenant_id": tenant_id, "provider": provider,
                 "deleted": True}
