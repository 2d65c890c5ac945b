"""The google provider: streamed answers (``streamGenerateContent?alt=sse``) and upstream errors."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers

from aiproxy.builtin.google import GoogleProvider
from aiproxy.builtin.google_wire import SIGNATURE
from aiproxy.call import Call
from aiproxy.config import ModelConfig
from aiproxy.errors import ProxyError
from aiproxy.router import Deployment
from tests.google_support import (
    GEMINI,
    GENERATE,
    GOOGLE_BASE,
    GOOGLE_KEY,
    STREAM,
    TIME,
    WEATHER,
    fixture,
    google_config,
    sent,
    sse_body,
    sse_events,
    sse_fixture,
)
from tests.helpers import GatedStream, assert_no_secret, error_of

STREAMED = {**GEMINI, "stream": True}
WITH_USAGE = {**STREAMED, "stream_options": {"include_usage": True}}


@pytest.fixture
async def gclient(gateway):
    async with gateway(google_config()) as pair:
        yield pair


def stream_route(upstream: Any, body: bytes | httpx.AsyncByteStream) -> Any:
    kind = {"content": body} if isinstance(body, bytes) else {"stream": body}
    return upstream.post(STREAM, params={"alt": "sse"}).respond(
        200, headers={"content-type": "text/event-stream"}, **kind)


# ------------------------------------------------------------ streamed answers
async def test_stream_text_in_openai_chunks(gclient):
    http, upstream = gclient
    route = stream_route(upstream, sse_fixture("stream_text.sse"))
    r = await http.post("/v1/chat/completions", json={**STREAMED, "temperature": 0.5, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    got = sent(route)
    assert got["generationConfig"] == {"temperature": 0.5}  # the same translation as a whole answer
    assert got["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {"chatcmpl-stream-1"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"gemini-2.5-flash"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello there."
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert all("usage" not in c for c in chunks)  # not asked for


async def test_stream_usage_chunk_only_when_asked_from_the_last_usage_metadata(gclient):
    http, upstream = gclient
    stream_route(upstream, sse_fixture("stream_text.sse"))
    chunks = sse_events((await http.post("/v1/chat/completions", json=WITH_USAGE)).text)[:-1]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25,
                                   "completion_tokens_details": {"reasoning_tokens": 12}}
    assert all("usage" not in c for c in chunks[:-1])


async def test_streamed_parallel_tool_calls_keep_indexes_and_ids(gclient):
    http, upstream = gclient
    stream_route(upstream, sse_fixture("stream_tool_calls.sse"))
    r = await http.post("/v1/chat/completions", json={**STREAMED, "tools": [WEATHER, TIME]})
    chunks = sse_events(r.text)[:-1]
    deltas = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "CET"})]
    assert all(d["type"] == "function" and d["id"].startswith("call_") for d in deltas)
    assert deltas[0]["id"].endswith(f"{SIGNATURE}CiQBVKhc7mSig/A=") and deltas[0]["id"] != deltas[1]["id"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]


async def test_streamed_candidates_keep_their_choice_index(gclient):
    http, upstream = gclient
    stream_route(upstream, sse_body(
        {"candidates": [{"content": {"parts": [{"text": "A"}], "role": "model"}, "index": 0},
                        {"content": {"parts": [{"text": "B"}], "role": "model"}, "index": 1}]},
        {"candidates": [{"content": {"parts": [{"text": "a"}], "role": "model"}, "index": 0,
                         "finishReason": "STOP"},
                        {"content": {"parts": [{"text": "b"}], "role": "model"}, "index": 1,
                         "finishReason": "MAX_TOKENS"}]}))
    chunks = sse_events((await http.post("/v1/chat/completions", json={**STREAMED, "n": 2})).text)[:-1]
    for index, text, finish in ((0, "Aa", "stop"), (1, "Bb", "length")):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(m["delta"].get("content", "") for m in mine) == text
        assert [m["finish_reason"] for m in mine if m["finish_reason"]] == [finish]


async def test_streamed_safety_stop_and_thoughts(gclient):
    http, upstream = gclient
    stream_route(upstream, sse_body(
        {"candidates": [{"content": {"parts": [{"text": "pondering", "thought": True}], "role": "model"}}]},
        {"candidates": [{"content": {"parts": [{"text": "Partial"}], "role": "model"},
                         "finishReason": "SAFETY"}],
         "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}}))
    chunks = sse_events((await http.post("/v1/chat/completions", json=STREAMED)).text)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "", "reasoning_content": "pondering"}
    assert deltas[1] == {"content": "Partial"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


async def test_streamed_blocked_prompt_is_a_plain_400(gclient):
    http, upstream = gclient
    stream_route(upstream, sse_body(fixture("prompt_blocked.json")))
    r = await http.post("/v1/chat/completions", json=STREAMED)
    assert r.status_code == 400
    assert error_of(r)["code"] == "content_filter"


async def test_mid_stream_error_event_ends_the_stream_with_an_error(gclient):
    http, upstream = gclient
    stream_route(upstream, sse_body(
        {"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}]},
        {"error": {"code": 500, "message": f"internal failure for key {GOOGLE_KEY}", "status": "INTERNAL"}}))
    r = await http.post("/v1/chat/completions", json=STREAMED)
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["content"] == "Hi"
    error = events[-1]["error"]
    assert error["type"] == "upstream_error" and "internal failure" in error["message"]
    assert_no_secret(r, GOOGLE_KEY)


@pytest.mark.parametrize("body", [b"", b"data: " + json.dumps(
    {"candidates": [{"content": {"parts": [{"text": "cut"}], "role": "model"}}]}).encode() + b"\n\n"])
async def test_a_stream_that_ends_early_is_an_error(gclient, body):
    http, upstream = gclient
    stream_route(upstream, body)
    r = await http.post("/v1/chat/completions", json=STREAMED)
    if body:
        assert sse_events(r.text)[-1]["error"]["code"] == "upstream_bad_response"
    else:
        assert r.status_code == 502


def direct(body: GatedStream, include_usage: bool = False) -> tuple[GoogleProvider, Call, Deployment]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, stream=body)))
    provider = GoogleProvider(google_config().providers["google"], http)
    deployment = Deployment(name="gemini-test", provider=provider, model="gemini-2.5-flash",
                            timeout=httpx.Timeout(5.0), options={},
                            config=ModelConfig(name="gemini-test", provider="google"))
    request = {**STREAMED, **({"stream_options": {"include_usage": True}} if include_usage else {})}
    call = Call(request_id="r1", operation="chat", body=request, model="gemini-test", stream=True,
                headers=Headers(), upstream_model="gemini-2.5-flash")
    return provider, call, deployment


async def test_each_event_goes_out_when_it_arrives_and_sets_usage():
    first, *rest = sse_fixture("stream_text.sse").split(b"\n\n", 1)
    body = GatedStream(first + b"\n\n", b"".join(rest))
    provider, call, deployment = direct(body)
    events = provider.chat_stream(call, deployment)
    chunk = await asyncio.wait_for(anext(events), 2)  # the rest of the upstream is still held back
    assert json.loads(chunk[len(b"data: "):])["choices"][0]["delta"]["content"] == "Hel"
    assert call.usage is not None and call.usage.completion_tokens == 1  # the usage so far
    body.gate.set()
    out = [json.loads(e[len(b"data: "):]) async for e in events]
    assert out[-1]["choices"][0]["finish_reason"] == "stop"  # no usage chunk: not asked for
    assert (call.usage.prompt_tokens, call.usage.completion_tokens, call.usage.total_tokens) == (9, 16, 25)
    await provider.http.aclose()


async def test_closing_a_stream_early_closes_the_upstream_response():
    raw = sse_fixture("stream_text.sse")
    body = GatedStream(raw[:raw.index(b"\n\n") + 2], raw)
    provider, call, deployment = direct(body)
    events = provider.chat_stream(call, deployment)
    await anext(events)
    await events.aclose()
    assert body.closed
    await provider.http.aclose()


async def test_a_bad_request_fails_before_anything_is_sent():
    body = GatedStream(b"", b"")
    provider, call, deployment = direct(body)
    call.body = {**call.body, "logit_bias": {"1": 2}}
    with pytest.raises(ProxyError) as info:
        provider.chat_stream(call, deployment)
    assert info.value.param == "logit_bias"
    await provider.http.aclose()


# ------------------------------------------------------------ upstream errors
@pytest.mark.parametrize("stream", [False, True])
async def test_429_with_retry_info_passes_retry_after(gclient, stream):
    http, upstream = gclient
    upstream.post(url__startswith=f"{GOOGLE_BASE}/models/").respond(429, json=fixture("error_429.json"))
    r = await http.post("/v1/chat/completions", json=STREAMED if stream else GEMINI)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "37"
    error = error_of(r)
    assert error["type"] == "rate_limit_error" and "quota" in error["message"]


async def test_429_retry_delay_with_fraction_rounds_up_and_header_wins(gclient):
    http, upstream = gclient
    body = fixture("error_429.json")
    body["error"]["details"][-1]["retryDelay"] = "1.2s"
    route = upstream.post(GENERATE).respond(429, json=body)
    assert (await http.post("/v1/chat/completions", json=GEMINI)).headers["retry-after"] == "2"
    route.respond(429, json=body, headers={"retry-after": "9"})
    assert (await http.post("/v1/chat/completions", json=GEMINI)).headers["retry-after"] == "9"


@pytest.mark.parametrize("delay", ["infs", "nans"])
async def test_429_retry_delay_that_is_no_number_of_seconds_is_ignored(gclient, delay):
    http, upstream = gclient
    body = fixture("error_429.json")
    body["error"]["details"][-1]["retryDelay"] = delay
    upstream.post(GENERATE).respond(429, json=body)
    r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 429, r.text  # not a 500
    assert "retry-after" not in r.headers


async def test_400_invalid_argument_passes_the_message(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(400, json=fixture("error_400.json"))
    r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 400
    assert 'Unknown name "bogus"' in error_of(r)["message"]


@pytest.mark.parametrize(("status", "name"), [(400, "error_api_key.json"), (403, None), (401, None)])
async def test_rejected_key_is_502_upstream_auth_failed(gclient, status, name, caplog):
    http, upstream = gclient
    body = fixture(name) if name else {"error": {"code": status, "message": f"bad key {GOOGLE_KEY}",
                                                 "status": "PERMISSION_DENIED"}}
    upstream.post(GENERATE).respond(status, json=body)
    with caplog.at_level(logging.DEBUG):
        r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 502
    assert error_of(r)["code"] == "upstream_auth_failed"
    assert_no_secret(r, GOOGLE_KEY)
    assert GOOGLE_KEY not in caplog.text


async def test_503_unavailable_is_503(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(503, json=fixture("error_503.json"))
    r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 503
    assert error_of(r)["type"] == "service_unavailable" and "overloaded" in error_of(r)["message"]


async def test_an_echoed_key_is_scrubbed(gclient, caplog):
    http, upstream = gclient
    upstream.post(url__startswith=f"{GOOGLE_BASE}/models/").respond(404, json={"error": {
        "code": 404, "message": f"models/x not found (key {GOOGLE_KEY})", "status": "NOT_FOUND"}})
    with caplog.at_level(logging.DEBUG):
        for body in (GEMINI, STREAMED):
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 404 and "[redacted]" in error_of(r)["message"]
            assert_no_secret(r, GOOGLE_KEY)
        r = await http.post("/v1/embeddings", json={"model": "gemini-embed", "input": "x"})
        assert r.status_code == 404
        assert_no_secret(r, GOOGLE_KEY)
    assert GOOGLE_KEY not in caplog.text


# ------------------------------------------------------------ legacy text completions
async def test_completion_is_one_user_turn_and_a_text_completion(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_two_candidates.json"))
    r = await http.post("/v1/completions", json={"model": "gemini-test", "prompt": ["Once upon"],
                                                 "max_tokens": 3, "n": 2, "best_of": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    assert sent(route) == {"contents": [{"role": "user", "parts": [{"text": "Once upon"}]}],
                           "generationConfig": {"maxOutputTokens": 3, "temperature": 0, "candidateCount": 2}}
    data = r.json()
    assert data["object"] == "text_completion" and data["id"] == "cmpl-two-cands"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in data["choices"]] == [
        (0, "First.", "stop"), (1, "Second, cut", "length")]
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


async def test_completion_stream_in_text_chunks_with_usage(gclient):
    http, upstream = gclient
    stream_route(upstream, sse_fixture("stream_text.sse"))
    r = await http.post("/v1/completions", json={"model": "gemini-test", "prompt": "Hi", "stream": True,
                                                 "stream_options": {"include_usage": True}})
    chunks = sse_events(r.text)[:-1]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert {c["id"] for c in chunks} == {"cmpl-stream-1"}
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello there."
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 25


@pytest.mark.parametrize(("extra", "param"), [
    ({"suffix": "end"}, "suffix"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt")])
async def test_completion_fields_gemini_cannot_honour_are_400(gclient, extra, param):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    r = await http.post("/v1/completions", json={"model": "gemini-test", "prompt": "x", **extra})
    assert r.status_code == 400 and error_of(r)["param"] == param
    assert not route.called
