"""Streams and timeouts under routing: retried only before the first byte, ended with an
error event after it; first-token, idle and total timeouts; a client that leaves cancels
the attempt in flight and no retry follows."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.config import parse_config
from aiproxy.plugins import build_plugin_manager
from tests.helpers import error_of
from tests.routing_support import A_URL, B_URL, PROVIDERS, answer, failure, pool, proxy
from tests.test_disconnect import _call_then_leave

SSE = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up","choices":'
       b'[{"index":0,"delta":{"role":"assistant","content":"from b"},"finish_reason":null}]}\n\n'
       b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"up","choices":'
       b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
       b"data: [DONE]\n\n")


def events(text: str) -> list[dict]:
    return [orjson.loads(e.removeprefix("data: ")) for e in text.strip().split("\n\n")
            if e != "data: [DONE]"]


async def test_a_stream_that_fails_before_its_first_byte_is_retried_elsewhere():
    async with proxy(pool("a", "b")) as p:
        a = p.upstream.post(A_URL).mock(return_value=failure(503))
        p.upstream.post(B_URL).respond(200, content=SSE, headers={"content-type": "text/event-stream"})
        r = await p.chat(stream=True)
    assert r.status_code == 200 and a.call_count == 1
    assert r.headers["x-aiproxy-deployment"] == "b" and r.headers["x-aiproxy-attempts"] == "2"
    assert events(r.text)[0]["choices"][0]["delta"]["content"] == "from b"
    assert r.text.endswith("data: [DONE]\n\n")


async def test_a_stream_whose_every_attempt_fails_is_an_http_error():
    async with proxy(pool("a", "b")) as p:
        p.upstream.post(A_URL).mock(return_value=failure(500))
        p.upstream.post(B_URL).mock(side_effect=httpx.ConnectError("refused"))
        r = await p.chat(stream=True)
    assert r.status_code == 502 and error_of(r)["code"] == "upstream_connect_error"


async def test_after_the_first_byte_a_failure_ends_the_stream_with_an_error_event():
    models = [{"name": "chat", "provider": "mock", "id": "m1", "retries": 3},
              {"name": "chat", "provider": "mock", "id": "m2"}]
    async with proxy(models) as p:
        r = await p.chat(stream=True, mock={"error_after": 2})
        assert p.router.stats.attempts == 1  # nothing was retried once bytes had gone out
    assert r.status_code == 200
    got = events(r.text)
    assert len(got) == 3 and "choices" in got[0] and "choices" in got[1]
    assert got[2]["error"]["code"] == "upstream_error"
    assert set(got[2]["error"]) == {"message", "type", "param", "code"}
    assert not r.text.endswith("data: [DONE]\n\n")


async def test_a_slow_first_token_is_retried_on_another_deployment():
    seen: list = []

    class After:
        @hookimpl
        def aiproxy_after_call(self, call):
            seen.append(call)

    cfg = parse_config({"plugins": {"dir": None}, "providers": PROVIDERS}, env={})
    pm = build_plugin_manager(cfg)
    pm.register(After(), name="after")
    models = [{"name": "chat", "provider": "mock", "id": "slow", "timeout": {"first_token": 0.02},
               "options": {"latency_ms": 10_000}},
              {"name": "chat", "provider": "mock", "id": "fast"}]
    async with proxy(models, plugin_manager=pm) as p:
        r = await asyncio.wait_for(p.chat(stream=True), 5)
    assert r.status_code == 200 and r.headers["x-aiproxy-deployment"] == "fast"
    [call] = seen
    assert [(x["deployment"], x.get("code")) for x in call.metadata["attempts"]] == [
        ("slow", "first_token_timeout"), ("fast", None)]


async def test_an_idle_stream_ends_with_a_timeout_event():
    models = [{"name": "chat", "provider": "mock", "timeout": {"idle": 0.02}, "retries": 2,
               "options": {"chunk_delay_ms": 10_000}}]
    async with proxy(models) as p:
        r = await asyncio.wait_for(p.chat(stream=True), 5)
        assert p.router.stats.attempts == 1
    got = events(r.text)
    assert "choices" in got[0]
    assert got[-1]["error"]["code"] == "upstream_idle_timeout"


async def test_a_total_timeout_ends_a_whole_answer_with_504():
    models = [{"name": "chat", "provider": "mock", "timeout": {"total": 0.02},
               "options": {"latency_ms": 10_000}}]
    async with proxy(models) as p:
        r = await asyncio.wait_for(p.chat(), 5)
    assert r.status_code == 504
    assert error_of(r)["type"] == "timeout_error"
    assert "timeout.total" in error_of(r)["message"]


async def test_provider_timeouts_apply_and_a_model_overrides_them():
    providers = {**PROVIDERS, "slowmock": {"plugin": "mock", "timeout": {"total": 0.02},
                                           "options": {"latency_ms": 10_000}}}
    models = [{"name": "strict", "provider": "slowmock"},
              {"name": "patient", "provider": "slowmock", "timeout": {"total": 30, "first_token": 0.02}}]
    async with proxy(models, providers=providers) as p:
        strict = await asyncio.wait_for(p.chat(model="strict"), 5)
        patient = await asyncio.wait_for(p.chat(model="patient", stream=True), 5)
        limits = p.router.pool("patient").deployments[0].limits
    assert strict.status_code == 504 and "0.02s (timeout.total)" in error_of(strict)["message"]
    assert patient.status_code == 504 and error_of(patient)["code"] == "first_token_timeout"
    assert (limits.total, limits.first_token, limits.connect) == (30, 0.02, 5.0)


# ---------------------------------------------------------------- a client that leaves

class SlowPool:
    """Two upstreams that take 5 s; records which were asked and which were cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.asked: list[str] = []
        self.cancelled: list[str] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.asked.append(host)
        self.started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.cancelled.append(host)
            raise
        return httpx.Response(200, json=answer())


async def test_a_client_that_leaves_cancels_the_attempt_and_no_retry_follows():
    for stream in (False, True):
        upstream = SlowPool()
        cfg = parse_config({"plugins": {"dir": None}, "providers": PROVIDERS, "models": [
            *pool("a", "b", retries=5, timeout={"total": 3, "first_token": 3})]}, env={})
        app = create_app(cfg, transport=httpx.MockTransport(upstream.handler))
        async with app.router.lifespan_context(app):
            _, took = await _call_then_leave(app, {"model": "chat", "stream": stream,
                                                   "messages": [{"role": "user", "content": "x"}]}, upstream)
            await asyncio.sleep(0.05)  # room for a retry that must not happen
            router = app.state.gateway.router
            assert router.stats.attempts == 1 and router.stats.retries == 0
            assert [d.in_flight for d in router.pool("chat").deployments] == [0, 0]
        assert took < 2
        assert upstream.asked == ["a.test"] and upstream.cancelled == ["a.test"]


async def test_least_busy_counts_a_stream_until_it_ends():
    from starlette.datastructures import Headers

    from aiproxy.call import Call

    models = pool("mock", "mock", strategy="least_busy")
    models[1]["id"] = "mock-2"
    async with proxy(models) as p:
        first, second = p.router.pool("chat").deployments
        call = Call(request_id="r", operation="chat", body={**BODY_STREAM}, model="chat", stream=True,
                    headers=Headers())
        call.deployment = p.router.pick("chat")
        event, rest = await p.router.stream(call, "chat_stream")
        assert event is not None and call.deployment.in_flight == 1  # under way: still counted
        nxt = p.router.pick("chat")
        assert nxt is not call.deployment  # so the next call goes to the other one
        chunks = [chunk async for chunk in rest]
        assert chunks and call.deployment.in_flight == 0
        assert {first.in_flight, second.in_flight} == {0}


BODY_STREAM = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}


async def test_a_guarded_stream_closed_before_its_second_event_closes_the_upstream():
    # the relay closes what attempts.stream returned, even when the client left after
    # the first event: the provider's stream (its upstream response) must close with it
    from types import SimpleNamespace

    from aiproxy.config import Timeouts
    from aiproxy.routing import attempts

    closed: list[bool] = []

    async def chat_stream(call, d):
        try:
            yield b"first"
            yield b"second"
        finally:
            closed.append(True)

    for count_streams in (False, True):
        closed.clear()
        d = SimpleNamespace(provider=SimpleNamespace(chat_stream=chat_stream), id="d", in_flight=0,
                            limits=Timeouts(idle=5.0, total=60.0), count_streams=count_streams)
        first, rest = await attempts.stream(SimpleNamespace(), d, "chat_stream")
        assert first == b"first"
        await rest.aclose()
        assert closed == [True] and d.in_flight == 0
