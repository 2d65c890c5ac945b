"""An in-process gateway for the cache tests: declared keys of two tenants (and keys of
none), a fake OpenAI upstream (respx) whose every answer is new ("answer 1", "answer 2",
…) so a hit is told from a second upstream call, and the cache plugin at hand; for the
single-flight tests, an upstream that holds calls until told (:class:`Upstream`)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import respx
from starlette.applications import Starlette

from aiproxy.app import create_app
from aiproxy.builtin.cache import ResponseCache
from aiproxy.config import Config
from tests.conftest import CHAT, OPENAI_BASE, make_config
from tests.routing_support import FakeClock

CHAT_URL = f"{OPENAI_BASE}/chat/completions"
EMBED_URL = f"{OPENAI_BASE}/embeddings"
KEYS = {  # name → (key, tenant)
    "a1": ("sk-cache-tenant-a-one-0001", "tenant-a"),
    "a2": ("sk-cache-tenant-a-two-0002", "tenant-a"),
    "b1": ("sk-cache-tenant-b-one-0003", "tenant-b"),
    "solo1": ("sk-cache-no-tenant-one-04", None),
    "solo2": ("sk-cache-no-tenant-two-05", None),
}
DET = {**CHAT, "temperature": 0}  # a deterministic chat: cacheable by default
EMBED = {"model": "embed-test", "input": "hello"}


def config(cache: dict[str, Any] | None = None, **overrides: Any) -> Config:
    declared = [{"name": name, "key": key, **({"tenant": tenant} if tenant else {})}
                for name, (key, tenant) in KEYS.items()]
    return make_config(keys={"declared": declared}, cache=cache or {}, **overrides)


def auth(name: str | None) -> dict[str, str]:
    return {} if name is None else {"authorization": f"Bearer {KEYS[name][0]}"}


def chat_answer(text: str, usage: tuple[int, int] = (5, 2)) -> dict[str, Any]:
    return {"id": "chatcmpl-upstream", "object": "chat.completion", "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                      "total_tokens": usage[0] + usage[1]}}


def chat_stream(text: str) -> bytes:
    words = text.split(" ")
    chunks = [{"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1700000000,
               "model": "gpt-4o-mini",
               "choices": [{"index": 0, "delta": {"content": (" " if i else "") + w},
                            "finish_reason": None}]} for i, w in enumerate(words)]
    chunks.append({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1700000000,
                   "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1700000000,
                   "model": "gpt-4o-mini", "choices": [],
                   "usage": {"prompt_tokens": 5, "completion_tokens": len(words),
                             "total_tokens": 5 + len(words)}})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@dataclass
class Gateway:
    http: httpx.AsyncClient
    upstream: respx.MockRouter
    chat: respx.Route  # every call answers "answer <n>", n counting upstream calls
    embed: respx.Route
    cache: ResponseCache
    clock: FakeClock
    app: Starlette

    async def post(self, body: dict[str, Any], key: str | None = None, path: str = "/v1/chat/completions",
                   **headers: str) -> httpx.Response:
        r = await self.http.post(path, json=body, headers={**auth(key), **headers})
        await self.cache.settle()  # Redis writes run in the background
        return r


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def events(r: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an SSE answer."""
    return [orjson.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def streamed_text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events(r) if c["choices"])


@asynccontextmanager
async def gateway(cfg: Config, **kwargs: Any) -> AsyncIterator[Gateway]:
    upstream = respx.MockRouter(assert_all_called=False, using=None)
    counter = itertools.count(1)

    def answer(request: httpx.Request) -> httpx.Response:
        n = next(counter)
        if b'"stream":true' in request.content:
            return httpx.Response(200, content=chat_stream(f"streamed answer {n}"),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=chat_answer(f"answer {n}"))

    chat = upstream.post(CHAT_URL).mock(side_effect=answer)
    embed = upstream.post(EMBED_URL).mock(side_effect=lambda request: httpx.Response(200, json={
        "object": "list", "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1 * next(counter), 0.2]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
    app = create_app(cfg, transport=httpx.MockTransport(upstream.async_handler), **kwargs)
    async with app.router.lifespan_context(app):
        plugin = app.state.plugin_manager.get_plugin("cache")
        clock = FakeClock()
        plugin.clock = clock
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as http:
            yield Gateway(http, upstream, chat, embed, plugin, clock, app)


async def check_tenant_isolation(g: Gateway) -> None:
    """Tenant A never gets tenant B's answer; keys of one tenant share; keys of no tenant and
    anonymous callers each have their own."""
    first = await g.post(DET, "a1")
    assert content(first) == "answer 1" and first.headers["x-aiproxy-cache"] == "miss"
    same_tenant = await g.post(DET, "a2")
    assert content(same_tenant) == "answer 1" and same_tenant.headers["x-aiproxy-cache"] == "hit"
    assert g.chat.call_count == 1  # same tenant: the upstream was called once
    other = await g.post(DET, "b1")
    assert content(other) == "answer 2" and other.headers["x-aiproxy-cache"] == "miss"
    assert g.chat.call_count == 2  # two tenants: twice
    assert content(await g.post(DET, "b1")) == "answer 2"
    assert content(await g.post(DET, "a1")) == "answer 1"
    assert content(await g.post(DET, "solo1")) == "answer 3"  # no tenant: the key's own
    assert content(await g.post(DET, "solo2")) == "answer 4"
    assert content(await g.post(DET)) == "answer 5"  # anonymous
    assert [content(await g.post(DET, k)) for k in ("solo1", "solo2", None)] == \
        ["answer 3", "answer 4", "answer 5"]
    assert g.chat.call_count == 5


class Upstream:
    """The chat route's answers: call n says "answer n" (streamed when asked); the calls in
    ``hold`` wait for :attr:`gate`, those in ``fail`` answer 500, those in ``cut`` stream
    without ever finishing."""

    def __init__(self, hold: Iterable[int] = (1,), fail: Iterable[int] = (), cut: Iterable[int] = ()) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self.hold, self.fail, self.cut = set(hold), set(fail), set(cut)
        self.cancelled = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        n = self.calls
        if n in self.hold:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if n in self.fail:
            return httpx.Response(500, json={"error": {"message": "upstream broke", "type": "server_error"}})
        if b'"stream":true' in request.content:
            body = chat_stream(f"streamed answer {n}")
            if n in self.cut:  # the body just stops: no finish_reason, no [DONE]
                body = body.split(b'"finish_reason":"stop"')[0].rsplit(b"data: ", 1)[0]
            return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=chat_answer(f"answer {n}"))


async def until(ready: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        assert time.monotonic() < deadline, "timed out waiting for the calls to line up"
        await asyncio.sleep(0.002)


def start(g: Gateway, body: dict[str, Any], key: str | None = "a1") -> asyncio.Task[httpx.Response]:
    return asyncio.ensure_future(g.http.post("/v1/chat/completions", json=body, headers=auth(key)))


Calls = list[asyncio.Task[httpx.Response]]


async def lined_up(g: Gateway, up: Upstream, body: dict[str, Any], followers: int,
                   key: str | None = "a1") -> tuple[asyncio.Task[httpx.Response], Calls]:
    """A leader held upstream, then ``followers`` identical calls waiting for it; when the
    leader streams, they ask for the whole answer (a stream does not follow)."""
    leader = start(g, body, key)
    await until(lambda: up.calls == 1)
    whole = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    rest = [start(g, whole, key) for _ in range(followers)]
    await until(lambda: g.cache.flights.waits == followers)
    return leader, rest


async def post_then_leave(app: Starlette, body: dict[str, Any], headers: dict[str, str],
                           leave: asyncio.Event) -> int:
    """POST to the app as a server would, the client disconnecting when ``leave`` is set;
    the status the app answered."""
    raw = orjson.dumps(body)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                         *((k.encode(), v.encode()) for k, v in headers.items())],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "state": {}}
    messages = iter([{"type": "http.request", "body": raw, "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        message = next(messages, None)
        if message is not None:
            return message
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return int(sent[0]["status"])
