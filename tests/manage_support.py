"""Shared by the management API tests: an app on a real database, and two tenants.

``manage_app(db_url)`` starts the gateway in-process (lifespan included, so the
``database`` plugin migrates and puts the store on ``app.state``); ``two_tenants``
fills it with tenants A and B, each with an admin and a member, each with a key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.builtin.auth import presented_key
from aiproxy.call import Call, Principal
from aiproxy.config import Config
from aiproxy.plugins import build_plugin_manager
from aiproxy.storage.keys import KeyStore, hash_key
from tests.conftest import make_config

MASTER = "sk-master-test-9f8e7d6c5b4a"


def manage_config(db_url: str, **overrides: Any) -> Config:
    sections: dict[str, Any] = {"server": {"master_key": MASTER}, "database": {"url": db_url}}
    return make_config(**{**sections, **overrides})


@dataclass
class Api:
    http: httpx.AsyncClient
    app: Starlette
    secrets: list[str] = field(default_factory=list)  # every plaintext key handed out
    # every answer, and the secret it handed out (None): for the grep tests
    answers: list[tuple[httpx.Response, str | None]] = field(default_factory=list)

    @property
    def store(self) -> KeyStore:
        store: KeyStore = self.app.state.key_store
        return store

    async def call(self, method: str, path: str, key: str | None = MASTER, **kwargs: Any) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **({"authorization": f"Bearer {key}"} if key else {})}
        r = await self.http.request(method, path if path.startswith("/v1") else f"/api/ai{path}",
                                    headers=headers, **kwargs)
        secret = r.json().get("key") if r.status_code == 201 and r.content.startswith(b"{") else None
        if isinstance(secret, str):
            self.secrets.append(secret)
        self.answers.append((r, secret if isinstance(secret, str) else None))
        return r

    async def chat(self, key: str, model: str = "mock-gpt") -> httpx.Response:
        return await self.call("POST", "/v1/chat/completions", key=key, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]})


class _StoreKeys:
    """Stand-in for the built-in virtual-key plugin while it is not loaded."""

    def __init__(self) -> None:
        self.app: Starlette | None = None

    @hookimpl
    def aiproxy_startup(self, app: Starlette) -> None:
        self.app = app

    @hookimpl
    async def aiproxy_authenticate(self, call: Call) -> Principal | None:
        key = presented_key(call.headers)
        if self.app is None or not key or not key.startswith("sk-"):
            return None
        record = await self.app.state.key_store.lookup_by_hash(hash_key(key))
        if record is None or record.status(dt.datetime.now(dt.UTC)) != "active":
            return None
        return Principal(id=record.id, kind="key", user=record.user_id, tenant=record.tenant_id,
                         tier=record.tier, roles=(record.role,), allowed_models=record.allowed_models)


@asynccontextmanager
async def manage_app(db_url: str, config: Config | None = None) -> AsyncIterator[Api]:
    config = config or manage_config(db_url)
    pm = build_plugin_manager(config)
    if not pm.has_plugin("keys"):
        pm.register(_StoreKeys(), name="store_keys")
    app = create_app(config, plugin_manager=pm)
    async with app.router.lifespan_context(app):  # ASGITransport skips lifespan
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://proxy") as http:
            yield Api(http, app)


@dataclass
class Tenant:
    id: str
    admin_user: str
    member_user: str
    admin_key: str
    admin_key_id: str
    member_key: str
    member_key_id: str


async def make_tenant(api: Api, name: str) -> Tenant:
    """A tenant with an admin and a member, each with a key, made through the API."""
    t = (await api.call("POST", "/tenants", json={"name": name})).json()
    admin = (await api.call("POST", "/users", json={"tenant_id": t["id"], "email": f"admin@{name}.test",
                                                     "role": "admin"})).json()
    member = (await api.call("POST", "/users", json={"tenant_id": t["id"],
                                                      "email": f"member@{name}.test"})).json()
    ak = (await api.call("POST", "/keys", json={"user_id": admin["id"], "role": "admin",
                                                 "name": f"{name}-admin"})).json()
    mk = (await api.call("POST", "/keys", json={"user_id": member["id"], "name": f"{name}-member",
                                                 "allowed_models": ["mock-gpt"]})).json()
    return Tenant(t["id"], admin["id"], member["id"], ak["key"], ak["id"], mk["key"], mk["id"])
