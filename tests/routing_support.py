"""An in-process gateway for routing tests: two fake OpenAI-compatible upstreams (``a`` and
``b``, told apart by URL through respx), the mock provider, and a router whose clock and
sleep are fake, so backoff and ``retry-after`` waits take no time and can be read back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pluggy
import respx

from aiproxy.app import create_app
from aiproxy.config import parse_config
from aiproxy.router import Router

A_URL = "https://a.test/v1/chat/completions"
B_URL = "https://b.test/v1/chat/completions"
C_URL = "https://c.test/v1/chat/completions"
PROVIDERS: dict[str, Any] = {
    "a": {"plugin": "openai", "api_base": "https://a.test/v1", "api_key": "sk-a-secret-1111"},
    "b": {"plugin": "openai", "api_base": "https://b.test/v1", "api_key": "sk-b-secret-2222"},
    "c": {"plugin": "openai", "api_base": "https://c.test/v1", "api_key": "sk-c-secret-3333"},
    "mock": {"plugin": "mock"},
}
BODY = {"model": "chat", "messages": [{"role": "user", "content": "Say hi"}]}


def answer(text: str = "hi", model: str = "up") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}


def failure(status: int, headers: dict[str, str] | None = None, message: str = "boom",
            code: str | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers,
                          json={"error": {"message": message, "type": "x", "code": code}})


class FakeClock:
    """Monotonic seconds that move only when told to (or when the router sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Proxy:
    http: httpx.AsyncClient
    upstream: respx.MockRouter
    router: Router
    clock: FakeClock
    sleeps: list[float] = field(default_factory=list)

    async def chat(self, **body: Any) -> httpx.Response:
        return await self.http.post("/v1/chat/completions", json={**BODY, **body})


@asynccontextmanager
async def proxy(models: list[dict[str, Any]], *, plugin_manager: pluggy.PluginManager | None = None,
                providers: dict[str, Any] | None = None, **sections: Any) -> AsyncIterator[Proxy]:
    cfg = parse_config({"plugins": {"dir": None}, "providers": providers or PROVIDERS, "models": models,
                        **sections}, env={})
    upstream = respx.MockRouter(assert_all_called=False, using=None)
    app = create_app(cfg, transport=httpx.MockTransport(upstream.async_handler),
                     plugin_manager=plugin_manager)
    async with app.router.lifespan_context(app):
        router: Router = app.state.gateway.router
        clock = FakeClock()
        router.clock = clock
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as http:
            p = Proxy(http, upstream, router, clock)

            async def sleep(seconds: float) -> None:
                p.sleeps.append(seconds)
                clock.now += seconds

            router.sleep = sleep
            yield p


def pool(*providers: str, name: str = "chat", **knobs: Any) -> list[dict[str, Any]]:
    """One ``models:`` entry per provider under ``name``; ``knobs`` on the first."""
    entries: list[dict[str, Any]] = [{"name": name, "provider": p, "model": f"up-{p}", "id": p}
                                     for p in providers]
    entries[0].update(knobs)
    return entries
