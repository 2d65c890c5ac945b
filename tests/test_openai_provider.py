"""The OpenAI-compatible provider: requests and answers pass through, streams are relayed."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from aiproxy import hookimpl
from aiproxy.call import Call, Usage
from aiproxy.config import Config
from aiproxy.plugins import build_plugin_manager
from tests.conftest import CHAT, OPENAI_BASE, make_config

CHAT_URL = f"{OPENAI_BASE}/chat/completions"
KEY = "sk-upstream-secret-123"


def completion(content: str = "Hi!", **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, **extra}


def chunk(content: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    data: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                            "model": "gpt-4o-mini",
                            "choices": [] if content is None else
                            [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    if usage is not None:
        data["usage"] = usage
    return orjson.dumps(data)


def sse_payloads(text: str) -> list[str]:
    """The data of each event in a relayed stream (the gateway frames one data line each)."""
    assert text.endswith("\n\n"), text
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


async def _stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def sse_response(*parts: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_stream(*parts))


class Recorder:
    """Keeps every call that reaches after_call / on_error."""

    def __init__(self) -> None:
        self.finished: list[Call] = []
        self.failed: list[Call] = []

    @hookimpl
    async def aiproxy_after_call(self, call: Call) -> None:
        self.finished.append(call)

    @hookimpl
    def aiproxy_on_error(self, call: Call) -> None:
        self.failed.append(call)


class Headers:
    """A before-call stage that adds an upstream header and a response header."""

    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        call.upstream_headers["x-team"] = "red"
        call.response_headers["x-cost"] = "0.25"


def plugins(cfg: Config, **objects: object) -> Any:
    pm = build_plugin_manager(cfg)
    for name, obj in objects.items():
        pm.register(obj, name=name)
    return pm


# ---------------------------------------------------------------- requests

async def test_chat_request_passes_through_with_only_model_replaced(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=completion())
    body = {
        "model": "gpt-test",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                  {"type": "image_url", "image_url": {"url": "x"}}]}],
        "temperature": 0.2,
        "logit_bias": {"50256": -100},
        "reasoning_effort": "low",
        "a_field_from_next_year": {"nested": [1, 2.5, None, True]},
    }
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    sent = orjson.loads(route.calls.last.request.content)
    assert sent == {**body, "model": "gpt-4o-mini"}
    assert list(sent) == list(body)  # field order kept too


async def test_provider_key_goes_in_authorization_header(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=completion())
    r = await http.post("/v1/chat/completions", json=CHAT,
                        headers={"authorization": "Bearer client-key-not-for-upstream"})
    assert r.status_code == 200, r.text
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.url.query == b""


async def test_azure_style_api_key_header_and_query(gateway):
    base = "https://res.openai.azure.test/openai/deployments/gpt4o"
    cfg = make_config(
        providers={"azure": {"plugin": "openai", "api_base": base, "api_key": "azure-key-1",
                             "options": {"auth_header": "api-key", "query": {"api-version": "2024-10-21"}}}},
        models=[{"name": "gpt-azure", "provider": "azure", "model": "gpt-4o"}])
    async with gateway(cfg) as (http, upstream):
        route = upstream.post(f"{base}/chat/completions").respond(200, json=completion())
        r = await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-azure"})
    assert r.status_code == 200, r.text
    request = route.calls.last.request
    assert request.headers["api-key"] == "azure-key-1"
    assert "authorization" not in request.headers
    assert request.url.params["api-version"] == "2024-10-21"
    assert request.url.path == "/openai/deployments/gpt4o/chat/completions"


async def test_provider_headers_are_sent(gateway):
    cfg = make_config(
        providers={"openai": {"plugin": "openai", "api_base": OPENAI_BASE, "api_key": KEY,
                              "headers": {"OpenAI-Organization": "org-42", "x-route": "eu"}}},
        models=[{"name": "gpt-test", "provider": "openai", "model": "gpt-4o-mini"}])
    async with gateway(cfg) as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=completion())
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    headers = route.calls.last.request.headers
    assert headers["openai-organization"] == "org-42"
    assert headers["x-route"] == "eu"
    assert headers["authorization"] == f"Bearer {KEY}"


async def test_client_headers_are_not_forwarded(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=completion())
    await http.post("/v1/chat/completions", json=CHAT, headers={"x-client-secret": "c-1", "cookie": "s=1"})
    headers = route.calls.last.request.headers
    assert "x-client-secret" not in headers
    assert "cookie" not in headers


# ---------------------------------------------------------------- whole answers

async def test_answer_bytes_are_relayed_unchanged(client):
    http, upstream = client
    raw = (b'{ "id": "chatcmpl-9", "object": "chat.completion", "created": 1,\n'
           b'  "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",\n'
           b'  "choices": [{"index": 0, "message": {"role": "assistant", "content": "\\u00e9t\\u00e9",'
           b' "annotations": []}, "finish_reason": "stop"}],\n'
           b'  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},'
           b' "a_future_field": {"x": 1.50} }')
    upstream.post(CHAT_URL).respond(200, content=raw, headers={"content-type": "application/json"})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert r.content == raw
    assert r.headers["content-type"] == "application/json"
    assert r.json()["a_future_field"] == {"x": 1.5}


async def test_usage_of_whole_answer_is_read_into_the_call(gateway):
    cfg = make_config()
    recorder = Recorder()
    async with gateway(cfg, plugin_manager=plugins(cfg, recorder=recorder)) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, json=completion(
            usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                   "prompt_tokens_details": {"cached_tokens": 4}}))
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    [call] = recorder.finished
    assert call.usage == Usage(11, 7, 18, 4)
    assert call.upstream_model == "gpt-4o-mini"
    assert call.response is not None and call.response["id"] == "chatcmpl-1"


async def test_completions_pass_through(client):
    http, upstream = client
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "text": " world", "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    route = upstream.post(f"{OPENAI_BASE}/completions").respond(200, json=answer)
    body = {"model": "gpt-test", "prompt": ["Hello", "Bye"], "echo": True, "suffix": "!"}
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == answer
    assert orjson.loads(route.calls.last.request.content) == {**body, "model": "gpt-4o-mini"}


async def test_streamed_completions_pass_through(client):
    http, upstream = client
    events = [b'{"object":"text_completion","choices":[{"text":"a","index":0}]}',
              b'{"object":"text_completion","choices":[{"text":"b","index":0}]}']
    route = upstream.post(f"{OPENAI_BASE}/completions").mock(return_value=sse_response(
        *(b"data: " + e + b"\n\n" for e in events), b"data: [DONE]\n\n"))
    r = await http.post("/v1/completions", json={"model": "gpt-test", "prompt": "x", "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert sse_payloads(r.text) == [e.decode() for e in events] + ["[DONE]"]
    assert orjson.loads(route.calls.last.request.content)["stream"] is True


async def test_embeddings_pass_through(client):
    http, upstream = client
    answer = {"object": "list", "model": "text-embedding-3-small",
              "data": [{"object": "embedding", "index": 0, "embedding": "AACAPwAAAEA="}],
              "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    route = upstream.post(f"{OPENAI_BASE}/embeddings").respond(200, json=answer)
    body = {"model": "embed-test", "input": ["two words"], "encoding_format": "base64", "dimensions": 2}
    r = await http.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == answer
    assert orjson.loads(route.calls.last.request.content) == {**body, "model": "text-embedding-3-small"}


# ---------------------------------------------------------------- streams

async def test_stream_relays_events_in_order_with_one_done(gateway):
    cfg = make_config()
    recorder = Recorder()
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    events = [chunk("He"), chunk("ll"), chunk("o"), chunk(usage=usage)]
    upstream_bytes = (
        b": OPENROUTER PROCESSING\n\n"
        + b"data: " + events[0] + b"\n\n"
        + b"event: ping\ndata: \n\n"      # an empty keep-alive event: dropped
        + b": ping\n\n"
        + b"data: " + events[1] + b"\r\n\r\n"
        + b"data: " + events[2] + b"\n\n"
        + b"data: " + events[3] + b"\n\n"
        + b"data: [DONE]\n\n"
    )
    # Cut the upstream bytes at awkward places: inside a field name, inside JSON, between \r and \n.
    cuts = [3, 30, upstream_bytes.index(b"\r\n") + 1, len(upstream_bytes) - 4]
    parts = [upstream_bytes[a:b] for a, b in zip([0, *cuts], [*cuts, len(upstream_bytes)], strict=True)]
    async with gateway(cfg, plugin_manager=plugins(cfg, recorder=recorder)) as (http, upstream):
        route = upstream.post(CHAT_URL).mock(return_value=sse_response(*parts))
        r = await http.post("/v1/chat/completions", json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.content == b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    sent = orjson.loads(route.calls.last.request.content)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    [call] = recorder.finished
    assert call.usage == Usage(9, 3, 12)
    assert call.error is None
    assert call.first_byte is not None


async def test_stream_without_upstream_done_still_ends_with_one_done(client):
    http, upstream = client
    upstream.post(CHAT_URL).mock(return_value=sse_response(b"data: " + chunk("a") + b"\n\n"))
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert sse_payloads(r.text) == [chunk("a").decode(), "[DONE]"]


async def test_stream_stops_at_upstream_done(client):
    http, upstream = client
    upstream.post(CHAT_URL).mock(return_value=sse_response(
        b"data: " + chunk("a") + b"\n\ndata: [DONE]\n\ndata: " + chunk("late") + b"\n\n"))
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert sse_payloads(r.text) == [chunk("a").decode(), "[DONE]"]


# ---------------------------------------------------------------- request ids and stage headers

async def test_request_id_is_generated_and_echoed(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, json=completion())
    r = await http.post("/v1/chat/completions", json=CHAT)
    generated = r.headers["x-request-id"]
    assert len(generated) >= 16
    r2 = await http.post("/v1/chat/completions", json=CHAT)
    assert r2.headers["x-request-id"] != generated
    r3 = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "trace-abc.123"})
    assert r3.headers["x-request-id"] == "trace-abc.123"


async def test_insane_request_id_is_replaced(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, json=completion())
    r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "x" * 500})
    assert r.status_code == 200
    assert r.headers["x-request-id"] != "x" * 500
    assert 0 < len(r.headers["x-request-id"]) <= 128


async def test_request_id_on_streams_and_errors(client):
    http, upstream = client
    upstream.post(CHAT_URL).mock(return_value=sse_response(b"data: " + chunk("a") + b"\n\n"))
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True},
                        headers={"x-request-id": "rid-stream"})
    assert r.headers["x-request-id"] == "rid-stream"
    r = await http.post("/v1/chat/completions", json={"model": "gpt-test"},
                        headers={"x-request-id": "rid-invalid"})
    assert r.status_code == 400
    assert r.headers["x-request-id"] == "rid-invalid"
    r = await http.post("/v1/chat/completions", json={**CHAT, "model": "nope"},
                        headers={"x-request-id": "rid-404"})
    assert r.status_code == 404
    assert r.headers["x-request-id"] == "rid-404"


async def test_before_call_headers_reach_upstream_and_client(gateway):
    cfg = make_config()
    async with gateway(cfg, plugin_manager=plugins(cfg, headers=Headers())) as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=completion())
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert route.calls.last.request.headers["x-team"] == "red"
        assert route.calls.last.request.headers["authorization"] == f"Bearer {KEY}"
        assert r.headers["x-cost"] == "0.25"

        route.mock(return_value=sse_response(b"data: " + chunk("a") + b"\n\n"))
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200
        assert route.calls.last.request.headers["x-team"] == "red"
        assert r.headers["x-cost"] == "0.25"


async def test_compressed_stream_is_decoded(client):
    # httpx asks upstreams for gzip; a proxy in front of an OpenAI-compatible server may
    # compress the event stream, and the relay must parse the decoded bytes.
    http, upstream = client
    events = [chunk("com"), chunk("pressed")]
    raw = gzip.compress(b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n")
    upstream.post(CHAT_URL).mock(return_value=httpx.Response(
        200, headers={"content-type": "text/event-stream", "content-encoding": "gzip"},
        content=_stream(raw[:20], raw[20:])))
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert sse_payloads(r.text) == [e.decode() for e in events] + ["[DONE]"]


# ---------------------------------------------------------------- odd upstream streams

async def test_whole_json_answer_to_a_stream_request_is_replayed_as_a_stream(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, json=completion("whole answer"))
    r = await http.post("/v1/chat/completions",
                        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) \
        == "whole answer"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5


async def test_upstream_error_event_mid_stream_ends_the_stream_scrubbed(client):
    http, upstream = client
    upstream.post(CHAT_URL).mock(return_value=sse_response(
        b"data: " + chunk("Hel") + b"\n\n",
        b'data: {"error": {"message": "overloaded for key ' + KEY.encode() + b'"}}\n\n',
        b"data: " + chunk("never") + b"\n\n", b"data: [DONE]\n\n"))
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    payloads = sse_payloads(r.text)
    assert len(payloads) == 2 and "[DONE]" not in payloads  # stops at the error: nothing after
    error = orjson.loads(payloads[1])["error"]
    assert error["code"] == "upstream_error" and "overloaded" in error["message"]
    assert KEY not in r.text


async def test_upstream_stream_with_no_event_is_502(client):
    http, upstream = client
    upstream.post(CHAT_URL).mock(return_value=sse_response(b": just a comment\n\n"))
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_bad_response"


class UpperCaseAuth:
    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        call.upstream_headers["Authorization"] = "Bearer tenant-own-key"


async def test_header_overrides_ignore_case_and_send_one_header(gateway):
    cfg = make_config(
        providers={"openai": {"plugin": "openai", "api_base": OPENAI_BASE, "api_key": KEY,
                              "headers": {"X-Route": "eu"}}},
        models=[{"name": "gpt-test", "provider": "openai", "model": "gpt-4o-mini"}])
    async with gateway(cfg, plugin_manager=plugins(cfg, byok=UpperCaseAuth())) as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=completion())
        r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    sent = route.calls.last.request.headers
    assert sent.get_list("authorization") == ["Bearer tenant-own-key"]
    assert sent.get_list("x-route") == ["eu"]


# ---------------------------------------------------------------- exact stream usage

async def test_stream_usage_is_asked_for_counted_and_kept_from_a_client_that_did_not_ask(gateway):
    cfg = make_config()
    recorder = Recorder()
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    async with gateway(cfg, plugin_manager=plugins(cfg, recorder=recorder)) as (http, upstream):
        route = upstream.post(CHAT_URL).mock(return_value=sse_response(
            b"data: " + chunk("a") + b"\n\n", b"data: " + chunk(usage=usage) + b"\n\ndata: [DONE]\n\n"))
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert sse_payloads(r.text) == [chunk("a").decode(), "[DONE]"]  # no usage chunk for it
    assert orjson.loads(route.calls.last.request.content)["stream_options"] == {"include_usage": True}
    assert recorder.finished[0].usage == Usage(4, 2, 6)


async def test_stream_usage_false_leaves_the_request_alone(gateway):
    cfg = make_config(
        providers={"openai": {"plugin": "openai", "api_base": OPENAI_BASE, "api_key": KEY,
                              "options": {"stream_usage": False}}},
        models=[{"name": "gpt-test", "provider": "openai", "model": "gpt-4o-mini"}])
    async with gateway(cfg) as (http, upstream):
        route = upstream.post(CHAT_URL).mock(return_value=sse_response(b"data: " + chunk("a") + b"\n\n"))
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert "stream_options" not in orjson.loads(route.calls.last.request.content)
