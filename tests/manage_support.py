"""Shared by the management API tests: an app on a real database, and two tenants.

``manage_app(db_url)`` starts the gateway in-process (lifespan included, so the
``database`` plugin migrates and puts the store on ``app.state``); ``two_tenants``
fills it with tenants A and B, each with an admin and a member, each with a key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette

from aiproxy.app import create_app
from aiproxy.config import Config
from aiproxy.storage.keys import KeyStore
from tests.conftest import make_config

MASTER = "sk-master-test-9f8e7d6c5b4a"
ENCRYPTION_KEY = "q2l5bXlqb2h0c2Z0a2V5Zm9ydGVzdHNvbmx5MTIzNDU="  # 32 bytes, base64: tests only


def manage_config(db_url: str, **overrides: Any) -> Config:
    sections: dict[str, Any] = {"server": {"master_key": MASTER}, "database": {"url": db_url},
                                "security": {"encryption_key": ENCRYPTION_KEY}}
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


@asynccontextmanager
async def manage_app(db_url: str, config: Config | None = None, *,
                     transport: httpx.AsyncBaseTransport | None = None) -> AsyncIterator[Api]:
    app = create_app(config or manage_config(db_url), transport=transport)
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
    ak = (await api.call("POST", "/keys", json={"user_id": admin["id"], "role": "admin", "tier": "pro",
                                                 "name": f"{name}-admin"})).json()
    mk = (await api.call("POST", "/keys", json={"user_id": member["id"], "name": f"{name}-member",
                                                 "allowed_models": ["mock-gpt"]})).json()
    return Tenant(t["id"], admin["id"], member["id"], ak["key"], ak["id"], mk["key"], mk["id"])
