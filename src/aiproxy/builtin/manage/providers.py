"""``GET /api/ai/providers``: the configured providers, their models and health, and
for an admin key of a tenant, its own key for each (``credential``: a fingerprint).

Never a key: ``api_base`` loses any user:password and query string (Azure's
``api-version`` is harmless, but a query is where some put credentials).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiproxy.builtin.manage.access import Caller, Result
from aiproxy.builtin.manage.credentials import credentials_of
from aiproxy.errors import ProxyError
from aiproxy.gateway import Gateway


def safe_base(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _health(gateway: Gateway, provider: str, models: list[str]) -> dict[str, Any]:
    router = gateway.router
    breaker = getattr(router, "breaker", None)
    reason = None
    cooling: list[str] = []
    ready = False
    for name in models:
        try:
            pool = router.pool(name)
        except ProxyError as exc:
            reason = reason or exc.message
            continue
        for d in pool.deployments:
            if d.provider.name != provider:
                continue
            ready = True
            if breaker is not None and breaker.cooling(d.id):
                cooling.append(d.id)
    if not models:
        return {"status": "idle", "detail": "no model in models: uses this provider"}
    if not ready:
        return {"status": "unavailable", "detail": reason}
    return {"status": "cooling_down" if cooling else "ready", "cooling_down": sorted(set(cooling))}


async def list_providers(caller: Caller) -> Result:
    caller.require_admin()
    gateway: Gateway = caller.request.app.state.gateway
    config = gateway.config
    store = getattr(caller.request.app.state, "credential_store", None)
    tenant = caller.principal.tenant
    own = await credentials_of(store, tenant) if store is not None and tenant and not caller.master else None
    data = []
    for name, provider in config.providers.items():
        models = [m.name for m in config.models if m.provider == name]
        data.append({"object": "provider", "name": name, "plugin": provider.plugin,
                     "api_base": safe_base(provider.api_base), "models": models,
                     **_health(gateway, name, models)})
        if own is not None:  # an admin key of a tenant: its own key for the provider, if any
            data[-1]["credential"] = own.get(name)
    return 200, {"object": "list", "data": data}
