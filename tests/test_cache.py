"""The response cache on its in-process backend: tenant isolation, TTLs (injected clock),
LRU bounds, per-request control, the temperature rule, streams, and config errors."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import orjson
import pytest

from aiproxy import hookimpl
from aiproxy.builtin.cache.backends import MemoryBackend
from aiproxy.call import Call
from aiproxy.config import ConfigError
from aiproxy.plugins import build_plugin_manager
from tests.cache_support import (
    DET,
    EMBED,
    chat_answer,
    check_tenant_isolation,
    config,
    content,
    events,
    gateway,
    streamed_text,
)
from tests.conftest import CHAT
from tests.helpers import error_of, with_plugins


async def test_tenant_a_never_gets_tenant_bs_answer() -> None:
    async with gateway(config()) as g:
        await check_tenant_isolation(g)
        assert g.cache.aiproxy_stats()["aiproxy_cache_hits_total"] == 6
        assert g.cache.aiproxy_stats()["aiproxy_cache_entries"] == 5


async def test_chat_expires_after_its_ttl_embeddings_after_theirs() -> None:
    async with gateway(config()) as g:  # defaults: chat 1 hour, embeddings 30 days
        assert content(await g.post(DET)) == "answer 1"
        first = (await g.post(EMBED, path="/v1/embeddings")).json()["data"][0]["embedding"]
        g.clock.now += 3599
        assert content(await g.post(DET)) == "answer 1"
        g.clock.now += 1
        expired = await g.post(DET)
        assert content(expired) == "answer 3" and expired.headers["x-aiproxy-cache"] == "miss"
        g.clock.now += 29 * 86400
        assert (await g.post(EMBED, path="/v1/embeddings")).json()["data"][0]["embedding"] == first
        assert g.embed.call_count == 1
        g.clock.now += 86400
        assert (await g.post(EMBED, path="/v1/embeddings")).json()["data"][0]["embedding"] != first
        assert g.embed.call_count == 2


async def test_ttl_seconds_is_the_chat_ttl_and_ttl_per_operation_and_model_override_it() -> None:
    cfg = config({"ttl_seconds": "60", "ttl": {"embedding": 10},
                  "models": {"embed-*": {"ttl_seconds": 20}}})
    async with gateway(cfg) as g:
        await g.post(DET)
        await g.post(EMBED, path="/v1/embeddings")
        g.clock.now += 19
        assert content(await g.post(DET)) == "answer 1"
        await g.post(EMBED, path="/v1/embeddings")
        assert g.embed.call_count == 1  # the model's 20 s, not the operation's 10 s
        g.clock.now += 1
        await g.post(EMBED, path="/v1/embeddings")
        assert g.embed.call_count == 2
        g.clock.now += 40
        assert content(await g.post(DET)) == "answer 4"  # 60 s for chat


async def test_least_recently_used_is_evicted_at_max_size() -> None:
    async with gateway(config({"max_size": 2})) as g:
        one, two, three = ({**DET, "messages": [{"role": "user", "content": q}]} for q in "abc")
        assert content(await g.post(one)) == "answer 1"
        assert content(await g.post(two)) == "answer 2"
        assert content(await g.post(one)) == "answer 1"  # one is now the most recent
        assert content(await g.post(three)) == "answer 3"  # evicts two
        assert content(await g.post(one)) == "answer 1"
        assert content(await g.post(two)) == "answer 4"
        stats = g.cache.aiproxy_stats()
        assert stats["aiproxy_cache_entries"] == 2 and stats["aiproxy_cache_evictions_total"] == 2


def test_memory_backend_is_bounded_in_bytes_too() -> None:
    now = [0.0]
    backend = MemoryBackend(max_entries=100, max_bytes=250, clock=lambda: now[0])
    for i in range(3):
        backend.set(f"k{i}", bytes(100), 60)
    assert backend.bytes == 200 and len(backend) == 2 and backend.get("k0") is None
    backend.set("k1", bytes(10), 60)  # replacing an entry counts its new size only
    assert backend.bytes == 110 and backend.get("k1") == bytes(10) and backend.get("k2") == bytes(100)
    now[0] = 60
    assert backend.get("k1") is None and backend.bytes == 100


async def test_an_answer_bigger_than_max_entry_bytes_is_not_stored() -> None:
    async with gateway(config({"max_entry_bytes": 100})) as g:
        assert content(await g.post(DET)) == "answer 1"
        assert content(await g.post(DET)) == "answer 2"
        assert g.cache.aiproxy_stats()["aiproxy_cache_too_big_total"] == 2


async def test_cache_control_no_cache_refreshes_and_no_store_leaves_no_trace() -> None:
    async with gateway(config()) as g:
        assert content(await g.post(DET)) == "answer 1"
        fresh = await g.post(DET, **{"cache-control": "No-Cache"})
        assert content(fresh) == "answer 2" and fresh.headers["x-aiproxy-cache"] == "skip"
        assert content(await g.post(DET)) == "answer 2"  # no-cache stored its answer
        other = {**DET, "messages": [{"role": "user", "content": "not stored"}]}
        unstored = await g.post(other, **{"cache-control": "max-age=0, no-store"})
        assert content(unstored) == "answer 3" and unstored.headers["x-aiproxy-cache"] == "skip"
        assert content(await g.post(other)) == "answer 4"  # nothing was stored
        assert content(await g.post(DET, **{"cache-control": "no-store"})) == "answer 5"
        assert content(await g.post(DET)) == "answer 2"  # and no-store did not read either


async def test_cache_ttl_header_sets_this_answers_ttl() -> None:
    async with gateway(config()) as g:
        assert content(await g.post(DET, **{"x-aiproxy-cache-ttl": "10"})) == "answer 1"
        g.clock.now += 9
        assert content(await g.post(DET)) == "answer 1"
        g.clock.now += 1
        assert content(await g.post(DET)) == "answer 2"
        long = {**DET, "messages": [{"role": "user", "content": "keep a day"}]}
        await g.post(long, **{"x-aiproxy-cache-ttl": "86400"})  # longer than chat's hour
        g.clock.now += 86399
        assert content(await g.post(long)) == "answer 3"


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", "", "99999999999999999", "7776001", "1e3"])
async def test_a_bad_cache_ttl_header_is_a_400_naming_it(value: str) -> None:
    async with gateway(config()) as g:
        r = await g.post(DET, **{"x-aiproxy-cache-ttl": value})
        assert r.status_code == 400
        error = error_of(r)
        assert error["param"] == "x-aiproxy-cache-ttl" and "x-aiproxy-cache-ttl" in error["message"]
        assert "7776000" in error["message"]
        assert g.chat.call_count == 0


@pytest.mark.parametrize(("extra", "cached"), [
    ({}, False),  # no temperature: the upstream's default, 1
    ({"temperature": 0.7}, False),
    ({"temperature": 0.7, "seed": 7}, False),
    ({"temperature": 1, "top_p": 0.1}, False),
    ({"temperature": 0}, True),
    ({"temperature": 0.0, "n": 1, "top_p": 0.5, "seed": 1}, True),
])
async def test_only_temperature_zero_is_cached_by_default(extra: dict[str, Any], cached: bool) -> None:
    async with gateway(config()) as g:
        body = {**CHAT, **extra}
        first = await g.post(body)
        assert first.headers["x-aiproxy-cache"] == ("miss" if cached else "skip")
        second = await g.post(body)
        assert content(second) == ("answer 1" if cached else "answer 2")
        assert second.headers["x-aiproxy-cache"] == ("hit" if cached else "skip")


async def test_a_model_marked_sampled_caches_sampled_calls() -> None:
    async with gateway(config({"models": {"gpt-*": {"sampled": "true"}}})) as g:
        body = {**CHAT, "temperature": 0.9}
        assert content(await g.post(body)) == "answer 1"
        assert content(await g.post(body)) == "answer 1"
        assert content(await g.post(CHAT)) == "answer 2"
        assert content(await g.post(CHAT)) == "answer 2"


async def test_the_key_ignores_who_and_how_but_not_what() -> None:
    async with gateway(config()) as g:
        assert content(await g.post(DET)) == "answer 1"
        same = [{**DET, "user": "someone"}, {**DET, "temperature": 0.0}, {**DET, "metadata": {"x": "y"}},
                {"messages": DET["messages"], "temperature": 0, "model": "gpt-test"}]
        for body in same:
            assert content(await g.post(body)) == "answer 1", body
        different = [{**DET, "max_tokens": 5}, {**DET, "seed": 3}, {**DET, "stop": ["x"]},
                     {**DET, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                     {**DET, "response_format": {"type": "json_object"}},
                     {**DET, "messages": [{"role": "user", "content": "Say hi!"}]}]
        for n, body in enumerate(different, start=2):
            assert content(await g.post(body)) == f"answer {n}", body


async def test_errors_are_not_cached() -> None:
    async with gateway(config()) as g:
        g.chat.side_effect = None
        g.chat.return_value = httpx.Response(500, json={"error": {"message": "boom", "type": "server_error"}})
        assert (await g.post(DET)).status_code >= 500
        g.chat.return_value = httpx.Response(200, json=chat_answer("after the error"))
        assert content(await g.post(DET)) == "after the error"
        assert g.chat.call_count == 2


class Seen:
    """What after-call sees of each call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        self.calls.append(call)


async def test_a_hit_carries_the_stored_usage_under_a_new_id() -> None:
    seen = Seen()
    cfg = config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, seen=seen)) as g:
        miss, hit = await g.post(DET), await g.post(DET)
        assert hit.json()["usage"] == miss.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                                               "total_tokens": 7}
        assert hit.json()["id"] != miss.json()["id"] and hit.json()["id"].startswith("chatcmpl-")
        assert hit.json()["created"] == miss.json()["created"]
        first, second = seen.calls
        assert not first.cached and second.cached
        assert second.usage is not None and second.usage.total_tokens == 7


async def test_a_stream_is_stored_and_replayed_as_a_stream() -> None:
    async with gateway(config()) as g:
        body = {**DET, "stream": True, "stream_options": {"include_usage": True}}
        first = await g.post(body)
        assert first.headers["x-aiproxy-cache"] == "miss"
        second = await g.post(body)
        assert second.headers["x-aiproxy-cache"] == "hit"
        assert second.headers["content-type"].startswith("text/event-stream")
        assert streamed_text(first) == streamed_text(second) == "streamed answer 1"
        assert _usage(second) == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        whole = await g.post(DET)  # the same request, not streamed: the stored stream's answer
        assert content(whole) == "streamed answer 1" and whole.json()["usage"]["total_tokens"] == 8
        assert g.chat.call_count == 1


async def test_a_stream_that_fails_midway_is_not_stored() -> None:
    async with gateway(config()) as g:
        def broken(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Broken())

        g.chat.side_effect = broken
        body = {**DET, "stream": True}
        cut = await g.post(body)
        assert cut.status_code == 200 and '"error"' in cut.text
        g.chat.side_effect = None
        g.chat.return_value = httpx.Response(200, json=chat_answer("whole"))
        assert content(await g.post(DET)) == "whole"
        assert g.chat.call_count == 2


class _Broken(httpx.AsyncByteStream):
    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",' \
              b'"choices":[{"index":0,"delta":{"content":"half"},"finish_reason":null}]}\n\n'
        raise httpx.ReadError("upstream went away")


def _usage(r: httpx.Response) -> Any:
    return next(c["usage"] for c in events(r) if c.get("usage"))


async def test_disabled_the_cache_answers_nothing_and_says_nothing() -> None:
    async with gateway(config({"enabled": "false"})) as g:
        assert content(await g.post(DET)) == "answer 1"
        r = await g.post(DET)
        assert content(r) == "answer 2" and "x-aiproxy-cache" not in r.headers


@pytest.mark.parametrize(("cache", "message"), [
    ({"ttl_seconds": "soon"}, "cache.ttl_seconds: expected a number of seconds, got 'soon'"),
    ({"ttl": {"chat": 0}}, "cache.ttl.chat: must be more than 0"),
    ({"ttl": {"video": 5}}, "cache.ttl.video: unknown operation"),
    ({"max_size": "-1"}, "cache.max_size: expected a whole number, got '-1'"),
    ({"max_size": 0}, "cache.max_size: must be at least 1"),
    ({"backend": "redis"}, "cache.backend: redis needs redis.url to be set"),
    ({"models": {"gpt-*": {"sampled": "maybe"}}}, "cache.models.gpt-*.sampled: expected true or false"),
    ({"models": {"gpt-*": {"ttl": 5}}}, "cache.models.gpt-*.ttl: unknown setting"),
    ({"tll_seconds": 5}, "cache.tll_seconds: unknown setting"),
    ({"single_flight": "maybe"}, "cache.single_flight: expected true or false, got 'maybe'"),
    ({"single_flight_wait": 0}, "cache.single_flight_wait: must be more than 0"),
    ({"single_flight_wait": "a minute"}, "cache.single_flight_wait: expected a number of seconds"),
])
def test_a_bad_cache_section_stops_start_up_naming_the_setting(cache: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_plugin_manager(config(cache))
    assert message in str(info.value)


async def test_a_redis_url_redis_cannot_use_leaves_the_cache_in_process(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aiproxy.cache"):
        async with gateway(config(redis={"url": "http://user:secret@127.0.0.1:1/0"})) as g:
            assert g.cache.redis is None
            assert content(await g.post(DET)) == "answer 1"
            assert content(await g.post(DET)) == "answer 1"
    assert "not a redis:// URL" in caplog.text and "secret" not in caplog.text


@pytest.mark.parametrize(("cache", "message"), [
    # YAML's .inf / .nan are floats: an infinite TTL made every Redis write fail (PX
    # overflows), which then left Redis alone as if it were down
    ({"ttl_seconds": float("inf")}, "cache.ttl_seconds: expected a finite number of seconds"),
    ({"ttl": {"embedding": float("nan")}}, "cache.ttl.embedding: expected a finite number of seconds"),
    ({"max_ttl_seconds": float("inf")}, "cache.max_ttl_seconds: expected a finite number of seconds"),
    ({"models": {"m": {"ttl_seconds": float("inf")}}}, "cache.models.m.ttl_seconds: expected a finite"),
])
def test_a_ttl_that_is_not_finite_stops_start_up_naming_it(cache: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_plugin_manager(config(cache))
    assert message in str(info.value)


async def test_cache_control_sent_as_several_headers_counts_every_one() -> None:
    # RFC 9110: several Cache-Control lines are one comma-separated list. Before, only the
    # last line was read: a client's no-store followed by another directive was stored.
    async with gateway(config()) as g:
        headers = [("cache-control", "no-store"), ("cache-control", "max-age=0")]
        first = await g.http.post("/v1/chat/completions", json=DET, headers=headers)
        await g.cache.settle()
        assert content(first) == "answer 1" and first.headers["x-aiproxy-cache"] == "skip"
        assert content(await g.post(DET)) == "answer 2"  # nothing was stored
        headers = [("cache-control", "no-cache"), ("cache-control", "max-stale=5")]
        fresh = await g.http.post("/v1/chat/completions", json=DET, headers=headers)
        assert content(fresh) == "answer 3" and fresh.headers["x-aiproxy-cache"] == "skip"


@pytest.mark.parametrize("stored", [b"\x00not json", b"[1, 2]", b'"text"'])
async def test_a_stored_value_that_is_not_an_answer_is_a_miss_not_a_500(stored: bytes) -> None:
    # e.g. another aiproxy version sharing the Redis prefix wrote its own format: the
    # call goes upstream and the entry is replaced; before, the hit's parse raised (500)
    async with gateway(config()) as g:
        assert content(await g.post(DET)) == "answer 1"
        (key,) = list(g.cache.memory._data)
        g.cache.memory.set(key, stored, 60)
        r = await g.post(DET)
        assert content(r) == "answer 2" and r.headers["x-aiproxy-cache"] == "miss"
        again = await g.post(DET)
        assert content(again) == "answer 2" and again.headers["x-aiproxy-cache"] == "hit"
        assert g.cache.aiproxy_stats()["aiproxy_cache_unreadable_total"] == 1


async def test_an_answer_from_a_fallback_model_is_not_stored_as_the_primarys() -> None:
    # the key names the upstream model the route picked; a fallback's answer (another
    # model: for embeddings, vectors of another space) must not be served for the primary
    # once it is back — before, it was stored under the primary's key for the whole TTL
    models = [{"name": "primary", "provider": "openai", "model": "gpt-4o", "retries": 0,
               "fallbacks": ["backup"]},
              {"name": "backup", "provider": "openai", "model": "gpt-4o-mini", "retries": 0}]
    async with gateway(config(models=models)) as g:
        down = {"primary": True}
        n = {"calls": 0}

        def answer(request: httpx.Request) -> httpx.Response:
            model = orjson.loads(request.content)["model"]
            if model == "gpt-4o" and down["primary"]:
                return httpx.Response(503, json={"error": {"message": "down", "type": "server_error"}})
            n["calls"] += 1
            return httpx.Response(200, json=chat_answer(f"{model} answer {n['calls']}"))

        g.chat.side_effect = answer
        body = {**DET, "model": "primary"}
        assert content(await g.post(body)) == "gpt-4o-mini answer 1"  # the fallback served it
        down["primary"] = False
        assert content(await g.post(body)) == "gpt-4o answer 2"  # not the fallback's, stored
        assert content(await g.post(body)) == "gpt-4o answer 2"  # the primary's own is cached
        assert content(await g.post({**DET, "model": "backup"})) == "gpt-4o-mini answer 3"


_LOGPROBS = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}],
             "refusal": None}


@pytest.mark.parametrize("first_streamed", [True, False])
async def test_a_call_asking_for_logprobs_is_not_cached(first_streamed: bool) -> None:
    # a streamed answer is assembled and a hit is replayed without logprobs (nor audio):
    # before, a streamed miss stored an answer with "logprobs": null that then answered a
    # whole request asking for them (and a whole one's were lost in a stream's replay)
    async with gateway(config()) as g:
        def answer(request: httpx.Request) -> httpx.Response:
            if b'"stream":true' in request.content:
                chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                                        "logprobs": _LOGPROBS, "finish_reason": None}]},
                          {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}]
                body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
                return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
            data = chat_answer("Hi")
            data["choices"][0]["logprobs"] = _LOGPROBS
            return httpx.Response(200, json=data)

        g.chat.side_effect = answer
        body = {**DET, "logprobs": True}
        first = await g.post({**body, "stream": True} if first_streamed else body)
        assert first.status_code == 200 and first.headers["x-aiproxy-cache"] == "skip"
        whole = await g.post(body)
        assert whole.json()["choices"][0]["logprobs"] == _LOGPROBS
        assert g.chat.call_count == 2
        assert content(await g.post({**DET, "logprobs": False})) == "Hi"  # not asked: cached
        assert (await g.post({**DET, "logprobs": False})).headers["x-aiproxy-cache"] == "hit"
