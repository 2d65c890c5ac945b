"""Shared fixtures: an in-process gateway whose upstreams are faked with respx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx

from aiproxy.app import create_app
from aiproxy.config import Config, parse_config

pytest.register_assert_rewrite("tests.helpers")
pytest_plugins = ["tests.storage_fixtures", "tests.redis_support"]  # db_url, …, store; prefix

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "Say hi"}]}
OPENAI_BASE = "https://api.openai.test/v1"
OLLAMA_BASE = "http://ollama.test:11434"


def make_config(**overrides: Any) -> Config:
    """A config with one provider of each built-in kind and a model on each.

    Keyword arguments replace top-level sections (``server=…``, ``models=…``, …).
    """
    raw: dict[str, Any] = {
        "plugins": {"dir": None},
        "providers": {
            "openai": {"plugin": "openai", "api_base": OPENAI_BASE, "api_key": "sk-upstream-secret-123"},
            "ollama": {"plugin": "ollama", "api_base": OLLAMA_BASE},
            "mock": {"plugin": "mock"},
        },
        "models": [
            {"name": "gpt-test", "provider": "openai", "model": "gpt-4o-mini"},
            {"name": "embed-test", "provider": "openai", "model": "text-embedding-3-small"},
            {"name": "llama-test", "provider": "ollama", "model": "llama3.2"},
            {"name": "mock-*", "provider": "mock"},
        ],
    }
    raw.update(overrides)
    return parse_config(raw, env={})


@pytest.fixture
def config() -> Config:
    return make_config()


Client = tuple[httpx.AsyncClient, respx.MockRouter]


@pytest.fixture
def gateway() -> Callable[..., Any]:
    """``async with gateway(config) as (http, upstream)``: a started app and its fake upstreams."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def start(config: Config | None = None, **kwargs: Any) -> AsyncIterator[Client]:
        upstream = respx.MockRouter(assert_all_called=False, using=None)
        app = create_app(config or make_config(), transport=httpx.MockTransport(upstream.async_handler),
                         **kwargs)
        async with app.router.lifespan_context(app):  # ASGITransport skips lifespan
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://proxy") as http:
                yield http, upstream

    return start


@pytest.fixture
async def client(gateway: Callable[..., Any], config: Config) -> AsyncIterator[Client]:
    async with gateway(config) as pair:
        yield pair
