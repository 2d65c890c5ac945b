"""Shared by the quota and budget tests: an injected clock, a stand-in cost stage, keys
declared in config, and a gateway whose quotas stage runs on that clock."""

from __future__ import annotations

import calendar
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import respx
from starlette.applications import Starlette

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.builtin.quotas import Quotas
from aiproxy.builtin.quotas.counters import LocalCounters
from aiproxy.call import Call
from aiproxy.config import Config
from aiproxy.plugins import build_plugin_manager
from tests.conftest import make_config

CHAT_URL = "/v1/chat/completions"
MOCK = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}


def epoch(*when: int) -> float:
    """UTC (year, month, day, hour, minute, second) → epoch seconds."""
    return float(calendar.timegm((*when, *(0,) * (6 - len(when)))))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Cost:
    """Sets ``call.cost`` in after-call, as the cost stage does (registered last: runs first)."""

    def __init__(self, usd: float) -> None:
        self.usd = usd

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        if not call.cached:
            call.cost = self.usd

    @hookimpl
    def aiproxy_on_error(self, call: Call) -> None:
        if call.usage is not None:
            call.cost = self.usd


def key(name: str, **fields: Any) -> dict[str, Any]:
    """A declared key whose secret is ``sk-<name>-…``."""
    return {"name": name, "key": secret(name), **fields}


def secret(name: str) -> str:
    return f"sk-{name}-" + "q" * 32


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret(name)}"}


def quota_config(quotas: dict[str, Any], keys: list[dict[str, Any]], **sections: Any) -> Config:
    """Keys required, these declared; the built-in cost stage off (``Cost`` stands in for it)."""
    sections.setdefault("plugins", {"dir": None, "disable": ["cost"]})
    return make_config(keys={"required": True, "declared": keys}, quotas=quotas, **sections)


@dataclass
class App:
    http: httpx.AsyncClient
    upstream: respx.MockRouter
    quotas: Quotas
    app: Starlette
    stats: dict[str, Any] = field(default_factory=dict)

    def counter(self, name: str) -> float | None:
        """An in-process counter's value (None: never touched)."""
        counters = self.quotas.counters
        assert isinstance(counters, LocalCounters)
        return counters.get(name)

    async def chat(self, who: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await self.http.post(CHAT_URL, json=body or MOCK, headers=auth(who))


@asynccontextmanager
async def started(config: Config, clock: Clock, *extra: object) -> AsyncIterator[App]:
    """An app on ``config`` with the quotas stage on ``clock`` and ``extra`` plugins."""
    pm = build_plugin_manager(config)
    for i, plugin in enumerate(extra):
        pm.register(plugin, name=f"test_{type(plugin).__name__.lower()}_{i}")
    quotas = pm.get_plugin("quotas")
    assert isinstance(quotas, Quotas)
    quotas.clock = clock
    upstream = respx.MockRouter(assert_all_called=False, using=None)
    app = create_app(config, transport=httpx.MockTransport(upstream.async_handler), plugin_manager=pm)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as http:
            yield App(http, upstream, quotas, app)
