"""A client that leaves before its answer begins cancels the upstream call (no tokens wasted)."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson

from aiproxy import gateway as gateway_module
from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.plugins import build_plugin_manager
from tests.conftest import CHAT, make_config


class SlowUpstream:
    """An upstream that takes 5 s to answer and notes whether it was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return httpx.Response(200, json={"choices": []})


class Errors:
    def __init__(self) -> None:
        self.seen = []

    @hookimpl
    def aiproxy_on_error(self, call, error):
        self.seen.append((call, error))


async def _call_then_leave(app, body: dict, upstream: SlowUpstream) -> tuple[list[dict], float]:
    """Drive the ASGI app as a server would; the client disconnects once the upstream is busy."""
    raw = orjson.dumps(body)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "state": {}}
    messages = iter([{"type": "http.request", "body": raw, "more_body": False}])
    sent: list[dict] = []

    async def receive() -> dict:
        message = next(messages, None)
        if message is not None:
            return message
        await upstream.started.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    began = time.monotonic()
    await asyncio.wait_for(app(scope, receive, send), timeout=4)
    return sent, time.monotonic() - began


async def test_leaving_cancels_a_whole_answer_and_is_recorded():
    await _leave_and_check(stream=False)


async def test_leaving_before_the_first_stream_event_cancels_it():
    await _leave_and_check(stream=True)


async def _leave_and_check(stream: bool) -> None:
    upstream = SlowUpstream()
    errors = Errors()
    cfg = make_config()
    pm = build_plugin_manager(cfg)
    pm.register(errors, name="errors")
    app = create_app(cfg, transport=httpx.MockTransport(upstream.handler), plugin_manager=pm)
    async with app.router.lifespan_context(app):
        _, took = await _call_then_leave(app, {**CHAT, "stream": stream}, upstream)
    assert took < 2, "the gateway waited for an upstream nobody was left to read"
    assert upstream.cancelled
    [(call, error)] = errors.seen
    assert error.status == 499 and error.code == "client_closed_request"
    assert call.metadata["client_disconnected"] is True


class QuickUpstream(SlowUpstream):
    async def handler(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={
            "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


class SlowAfterCall(Errors):
    """An after-call stage that awaits (as one settling in Redis does) while the client leaves."""

    def __init__(self, left: asyncio.Event, upstream: SlowUpstream) -> None:
        super().__init__()
        self.left, self.upstream, self.finished = left, upstream, False

    @hookimpl
    async def aiproxy_after_call(self, call):
        self.upstream.started.set()  # the client leaves now
        await asyncio.sleep(0.05)
        self.finished = True


async def test_a_client_leaving_after_the_answer_came_does_not_cut_the_after_call_stages():
    """The upstream answered: the stages account for that answer, whole, and the call is not
    turned into a 499 that on-error would count a second time."""
    upstream = QuickUpstream()
    stage = SlowAfterCall(asyncio.Event(), upstream)
    cfg = make_config()
    pm = build_plugin_manager(cfg)
    pm.register(stage, name="slow_after_call")
    app = create_app(cfg, transport=httpx.MockTransport(upstream.handler), plugin_manager=pm)
    async with app.router.lifespan_context(app):
        await _call_then_leave(app, CHAT, upstream)
    assert stage.finished
    assert stage.seen == []  # no on-error 499 after the after-call


async def _watchers_for(upstream: SlowUpstream, monkeypatch) -> int:
    """How many disconnect watchers one call that its client does not leave started."""
    started: list[str] = []
    create_task = asyncio.create_task

    def counting(coro, **kwargs):
        started.append(coro.__qualname__)
        return create_task(coro, **kwargs)

    monkeypatch.setattr(asyncio, "create_task", counting)
    app = create_app(make_config(), transport=httpx.MockTransport(upstream.handler))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p") as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    return sum(name.endswith("watch") for name in started)


async def test_a_call_answered_at_once_starts_no_watcher(monkeypatch):
    assert await _watchers_for(QuickUpstream(), monkeypatch) == 0


class TakesAWhile(QuickUpstream):
    async def handler(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(gateway_module.WATCH_AFTER * 5)
        return await super().handler(request)


async def test_a_call_still_running_after_watch_after_is_watched(monkeypatch):
    assert await _watchers_for(TakesAWhile(), monkeypatch) == 1
