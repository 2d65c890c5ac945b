"""Helpers shared by the error, validation and auth tests: the OpenAI error shape, secret
checks, and plugin managers with extra hook objects; and a started ``aiproxy serve`` for the
end-to-end tests.

pytest rewrites the asserts of test modules only, so the ones here say what failed themselves.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.call import Call
from aiproxy.config import Config
from aiproxy.errors import ProxyError
from aiproxy.plugins import build_plugin_manager
from tests.conftest import CHAT, OPENAI_BASE, make_config

CHAT_URL = f"{OPENAI_BASE}/chat/completions"
KEY = "sk-upstream-secret-123"
STREAM = {**CHAT, "stream": True}


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error answer, checking the shape on the way."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


def assert_no_secret(r: httpx.Response, secret: str = KEY) -> None:
    assert secret not in r.text, r.text
    for name, value in r.headers.items():
        assert secret not in value, name


def with_plugins(cfg: Config, **objects: object) -> Any:
    pm = build_plugin_manager(cfg)
    for name, obj in objects.items():
        pm.register(obj, name=name)
    return pm


class Errors:
    """Records what the on_error hook sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[Call, ProxyError]] = []

    @hookimpl
    async def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        self.seen.append((call, error))


# ---------------------------------------------------------------- a started server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"aiproxy serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if http.get(f"{url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"aiproxy serve was not healthy within {timeout:g}s:\n{log.read_text()}")


@dataclass
class Started:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    config: Path


@contextmanager
def started_proxy(config: dict[str, Any], cwd: Path, *args: str, log_name: str = "aiproxy.log",
                  stop_timeout: float = 10.0) -> Iterator[Started]:
    """`aiproxy serve` on `config` (written to cwd/config.yaml) on a free loopback port, with no
    AIPROXY_* variables from the environment and its output in cwd/`log_name`; healthy when
    yielded; terminated (then killed) after, unless it has already exited."""
    path = cwd / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port, log = free_port(), cwd / log_name
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPROXY_")}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "aiproxy", "serve", "--config", str(path),
                                    "--host", "127.0.0.1", "--port", str(port), *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, log)
        yield Started(url, process, log, path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class GatedStream(httpx.AsyncByteStream):
    """An upstream body that sends its first part, then waits for the test's go-ahead
    (``gate.set()``); ``closed`` says whether the gateway closed it."""

    def __init__(self, first: bytes, rest: bytes) -> None:
        self.first, self.rest = first, rest
        self.gate = asyncio.Event()
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        await self.gate.wait()
        yield self.rest

    async def aclose(self) -> None:
        self.closed = True


def streamed_tool_call(chunks: list[Any]) -> tuple[str, str, set[str]]:
    """The one tool call an openai SDK stream carried: its name and arguments joined from
    the deltas, and the ids it was given (a stream must give one)."""
    name, arguments, ids = "", "", set()
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or [] if c.choices else []:
            assert tc.index == 0, tc
            if tc.id:
                ids.add(tc.id)
            if tc.function:
                name += tc.function.name or ""
                arguments += tc.function.arguments or ""
    return name, arguments, ids


async def post_all(cases: list[tuple[str, Any]]) -> list[httpx.Response]:
    """POST each (path, body) in turn, the body as JSON, to one app on the default config
    (the fuzzers: whatever the body, an answer or a well-shaped error)."""
    app = create_app(make_config())
    out = []
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as http:
            for path, body in cases:
                out.append(await http.post(path, content=json.dumps(body)))
    return out
