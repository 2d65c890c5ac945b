"""The stage hooks a plugin can implement, each seen doing its job through the gateway."""

from __future__ import annotations

import orjson
import pytest
from starlette.responses import JSONResponse
from starlette.routing import Route

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.provider import Reply
from tests.conftest import CHAT, OPENAI_BASE, make_config
from tests.helpers import with_plugins

CHAT_URL = f"{OPENAI_BASE}/chat/completions"
CACHED = {"id": "chatcmpl-cached", "object": "chat.completion", "created": 7, "model": "gpt-4o-mini",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the cache"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}


class Cache:
    def __init__(self, hit: bool) -> None:
        self.hit = hit
        self.stored: list[Reply] = []
        self.finished = []

    @hookimpl
    async def aiproxy_cache_lookup(self, call):
        return Reply(dict(CACHED)) if self.hit else None

    @hookimpl
    def aiproxy_cache_store(self, call, reply):
        self.stored.append(reply)

    @hookimpl
    def aiproxy_after_call(self, call):
        self.finished.append(call)


async def test_a_cache_hit_answers_without_the_upstream(gateway):
    cfg = make_config()
    cache = Cache(hit=True)
    async with gateway(cfg, plugin_manager=with_plugins(cfg, test_cache=cache)) as (http, upstream):
        route = upstream.post(CHAT_URL).respond(500)
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json() == CACHED
    assert not route.called
    assert cache.stored == []  # a hit is not stored again
    [call] = cache.finished
    assert call.cached and call.usage.total_tokens == 6 and call.attempts == 0


async def test_a_cache_hit_is_replayed_to_a_stream(gateway):
    cfg = make_config()
    cache = Cache(hit=True)
    async with gateway(cfg, plugin_manager=with_plugins(cfg, test_cache=cache)) as (http, _):
        r = await http.post("/v1/chat/completions",
                            json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in r.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-cached" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) \
        == "from the cache"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6


async def test_a_fresh_answer_is_offered_to_the_cache(gateway):
    cfg = make_config()
    cache = Cache(hit=False)
    async with gateway(cfg, plugin_manager=with_plugins(cfg, test_cache=cache)) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, json=CACHED)
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    [reply] = cache.stored
    assert reply.data == CACHED
    assert not cache.finished[0].cached


class Admin:
    """A plugin with its own routes, start-up, shutdown and readiness."""

    def __init__(self, log: list[str], name: str, fail_start: bool = False, ready: bool = True) -> None:
        self.log, self.name, self.fail_start, self.ready = log, name, fail_start, ready

    @hookimpl
    def aiproxy_routes(self, config):
        async def hello(request):
            return JSONResponse({"hello": self.name, "models": len(config.models)})
        return [Route(f"/api/ai/{self.name}", hello)]

    @hookimpl
    async def aiproxy_startup(self, app, settings):
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name} {settings.get('flag')}")

    @hookimpl
    async def aiproxy_shutdown(self):
        self.log.append(f"stop {self.name}")
        if self.name == "b":
            raise RuntimeError("b fails to stop; c must still stop")

    @hookimpl
    def aiproxy_readiness(self):
        return {"name": self.name, "ok": self.ready, "detail": "up" if self.ready else "down"}


async def test_plugin_routes_lifecycle_and_readiness(gateway):
    cfg = make_config(a={"flag": "on"})
    log: list[str] = []
    pm = with_plugins(cfg, a=Admin(log, "a"), b=Admin(log, "b"), c=Admin(log, "c", ready=False))
    async with gateway(cfg, plugin_manager=pm) as (http, _):
        r = await http.get("/api/ai/a")
        assert r.json() == {"hello": "a", "models": 4}
        assert log == ["start c None", "start b None", "start a on"]  # pluggy order: last registered first
        r = await http.get("/ready")
        assert r.status_code == 503
        assert {c["name"]: c["ok"] for c in r.json()["checks"]} == {"a": True, "b": True, "c": False}
        assert (await http.get("/health")).status_code == 200
    assert log[3:] == ["stop a", "stop b", "stop c"]  # reversed; b's failure skipped nobody


async def test_a_failed_start_up_stops_only_what_started():
    cfg = make_config()
    log: list[str] = []
    pm = with_plugins(cfg, a=Admin(log, "a"), b=Admin(log, "b", fail_start=True), c=Admin(log, "c"))
    app = create_app(cfg, plugin_manager=pm)
    with pytest.raises(RuntimeError, match="b cannot start"):
        async with app.router.lifespan_context(app):
            pass
    assert log == ["start c None", "stop c"]


class Broken:
    @hookimpl
    def aiproxy_after_call(self, call):
        raise RuntimeError("this stage is broken")

    @hookimpl
    def aiproxy_on_error(self, call, error):
        raise RuntimeError("this stage is broken too")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    @hookimpl
    def aiproxy_after_call(self, call):
        self.seen.append(("after", 200))

    @hookimpl
    def aiproxy_on_error(self, call, error):
        self.seen.append(("error", error.status))


async def test_a_failing_after_call_or_on_error_stage_skips_no_other_stage(gateway, caplog):
    """The stages registered before a broken one (called after it: usage log, metrics)
    still see every call, and the client still gets its answer."""
    cfg = make_config()
    recorder = Recorder()
    pm = with_plugins(cfg, test_recorder=recorder, test_broken=Broken())  # broken is called first
    async with gateway(cfg, plugin_manager=pm) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, json=CACHED)
        ok = await http.post("/v1/chat/completions", json=CHAT)
        upstream.post(CHAT_URL).respond(500, json={"error": {"message": "down"}})
        failed = await http.post("/v1/chat/completions", json=CHAT)
    assert ok.status_code == 200 and failed.status_code == 502
    assert recorder.seen == [("after", 200), ("error", 502)]
    assert sum("plugin 'test_broken' failed" in r.getMessage() for r in caplog.records) == 2


async def test_a_whole_answer_without_usage_gets_an_estimate_every_stage_sees(gateway):
    cfg = make_config()
    cache = Cache(hit=False)
    answer = {k: v for k, v in CACHED.items() if k != "usage"}
    async with gateway(cfg, plugin_manager=with_plugins(cfg, test_cache=cache)) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, json=answer)
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and "usage" not in r.json()  # the client gets what was sent
    [call] = cache.finished
    assert call.metadata["usage_estimated"] is True
    assert call.usage.completion_tokens == 4  # "from the cache": 14 bytes, ceil(14 / 4)
    assert call.usage.prompt_tokens > 0
    assert call.usage.total_tokens == call.usage.prompt_tokens + 4
