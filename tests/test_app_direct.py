"""The app's short way in for the hot POST routes answers exactly as Starlette's full stack
would, and steps aside whenever that stack has something to add (middleware, a root path,
a path it does not serve as it is)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

from aiproxy import gateway as gateway_module
from aiproxy.app import App, create_app
from tests.conftest import make_config

CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def started(app: App, root_path: str = "") -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
            yield http


def test_the_hot_post_routes_are_served_directly() -> None:
    app = create_app(make_config())
    assert isinstance(app, App)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages"} <= set(app._direct)
    assert "/v1/models" not in app._direct  # a GET: Starlette's


async def test_direct_and_full_stack_answer_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(make_config())
    async with started(app) as http:
        direct = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "same"})
        bad = await http.post("/v1/chat/completions", content=b"{not json")
        monkeypatch.setattr(App, "__call__", App.__mro__[1].__call__)  # Starlette's way only
        full = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "same"})
        full_bad = await http.post("/v1/chat/completions", content=b"{not json")
    assert direct.status_code == full.status_code == 200
    assert direct.json()["choices"] == full.json()["choices"]
    assert dict(direct.headers) == dict(full.headers)
    assert bad.status_code == full_bad.status_code == 400 and bad.json() == full_bad.json()


async def test_an_endpoint_that_raises_gets_the_openai_shaped_500(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(make_config())

    def broken(self: Any, request: Any, operation: str) -> Any:
        raise RuntimeError("boom in new_call")

    monkeypatch.setattr(gateway_module.Gateway, "new_call", broken)
    async with started(app) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error" and "boom" not in r.text
    assert r.headers["x-request-id"]
    assert "boom in new_call" in caplog.text  # logged, as Starlette's handler logs it


async def test_middleware_sees_every_call_once_added() -> None:
    app = create_app(make_config())
    seen: list[str] = []

    async def note(request: Request, call_next: Any) -> Response:
        seen.append(request.url.path)
        response: Response = await call_next(request)
        response.headers["x-through-middleware"] = "yes"
        return response

    app.add_middleware(BaseHTTPMiddleware, dispatch=note)
    async with started(app) as http:
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-through-middleware"] == "yes"
    assert seen == ["/v1/chat/completions"]


async def test_under_a_root_path_starlette_routes_it() -> None:
    app = create_app(make_config())
    async with started(app, root_path="/gw") as http:
        r = await http.post("/gw/v1/chat/completions", json=CHAT)
        slash = await http.post("/v1/chat/completions/", json=CHAT, follow_redirects=False)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "mock-gpt"
    assert slash.status_code in (307, 404)  # Starlette's answer for a path it does not serve as is
