"""``POST /v1/messages`` and ``/v1/messages/count_tokens`` in process: what reaches an
OpenAI-compatible upstream (respx), what the client gets back, and every failure in
Anthropic's error shape with the gateway's status.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from anthropic.types import Message

from aiproxy import hookimpl
from aiproxy.call import Call, Principal
from aiproxy.errors import ProxyError
from tests.conftest import OPENAI_BASE, make_config
from tests.helpers import Errors, assert_no_secret, with_plugins

CHAT_URL = f"{OPENAI_BASE}/chat/completions"
MESSAGES = {"model": "gpt-test", "max_tokens": 100, "messages": [{"role": "user", "content": "Say hi"}]}
WEATHER = {"name": "get_weather",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def anthropic_error(r: httpx.Response) -> dict[str, Any]:
    """The error object of an Anthropic-shaped error answer, checking the shape on the way."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    return dict(body["error"])


def openai_answer(content: str | None = "Hi!", finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, **message}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def sse_body(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def parse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_whole_answer_through_an_openai_upstream(gateway: Callable[..., Any]) -> None:
    async with gateway() as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=openai_answer())
        r = await http.post("/v1/messages", json={**MESSAGES, "system": "Be kind.", "top_k": 3,
                                                   "metadata": {"user_id": "u1"}},
                            headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    message = Message.model_validate(r.json())
    assert message.model == "gpt-test"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == "Hi!"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 3)
    assert r.headers["x-request-id"]
    sent = json.loads(route.calls.last.request.content)
    assert sent == {"model": "gpt-4o-mini", "max_tokens": 100, "user": "u1", "messages": [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"}]}


async def test_tool_call_answer(gateway: Callable[..., Any]) -> None:
    answer = openai_answer(None, "tool_calls", tool_calls=[
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}])
    async with gateway() as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=answer)
        r = await http.post("/v1/messages", json={**MESSAGES, "tools": [WEATHER],
                                                   "tool_choice": {"type": "any"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                "input": {"city": "Oslo"}}]
    assert body["stop_reason"] == "tool_use"
    sent = json.loads(route.calls.last.request.content)
    assert sent["tool_choice"] == "required"
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                               "parameters": WEATHER["input_schema"]}}]


async def test_stream_through_an_openai_upstream(gateway: Callable[..., Any]) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    stream = sse_body(
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}},
    )
    async with gateway() as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, content=stream,
                                                headers={"content-type": "text/event-stream"})
        r = await http.post("/v1/messages", json={**MESSAGES, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_events(r.text)
    assert [n for n, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                      "content_block_delta", "content_block_stop", "message_delta",
                                      "message_stop"]
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "Hello"
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"] == {"input_tokens": 8, "output_tokens": 2}
    sent = json.loads(route.calls.last.request.content)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("cached", [False, True])
async def test_a_long_stream_decodes_each_chunk_once(gateway: Callable[..., Any],
                                                     monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    """The gateway decodes each chunk once for the Anthropic events and for the answer it
    assembles (folded every 128 events; whole at the end when the cache asks for it).
    Before: the egress and the assembly each decoded every chunk."""
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    words = [f" w{n}" for n in range(400)]
    stream = sse_body(*[{**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                        for w in words],
                      {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                      {**base, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 400,
                                                        "total_tokens": 408}})
    decoded = []
    loads = orjson.loads

    def counting(data: Any) -> Any:
        decoded.append(data)
        return loads(data)

    config = make_config(cache={"enabled": cached})
    async with gateway(config) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, content=stream, headers={"content-type": "text/event-stream"})
        body = {**MESSAGES, "stream": True, "temperature": 0}
        monkeypatch.setattr(orjson, "loads", counting)
        r = await http.post("/v1/messages", json=body)
        monkeypatch.undo()
        assert r.status_code == 200
        if cached:  # the whole answer was stored: a hit replays it the same
            hit = await http.post("/v1/messages", json=body)
            assert hit.headers["x-aiproxy-cache"] == "hit"
            assert _text_of(hit) == "".join(words)
    assert _text_of(r) == "".join(words)
    # the request body aside, each chunk once; the OpenAI provider also reads the usage chunk
    chunks = [d for d in decoded if isinstance(d, bytes) and d.startswith(b'{"id":"c"')
              and b'"usage"' not in d]
    assert len(chunks) == len(set(chunks)) == len(words) + 1


def _text_of(r: httpx.Response) -> str:
    return "".join(d["delta"]["text"] for n, d in parse_events(r.text) if n == "content_block_delta")


async def test_stream_from_the_mock_provider(gateway: Callable[..., Any]) -> None:
    async with gateway() as (http, _):
        r = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude", "stream": True,
                                                   "mock": {"reply": "one two three"}})
        whole = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude",
                                                       "mock": {"reply": "one two three"}})
    events = parse_events(r.text)
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "one two three" == whole.json()["content"][0]["text"]
    assert events[-2][1]["usage"] == whole.json()["usage"]


async def test_a_429_keeps_its_status_and_retry_after(gateway: Callable[..., Any]) -> None:
    """A stage's refusal (a rate limit) reaches the Anthropic client with its headers."""

    class Limit:
        @hookimpl
        def aiproxy_before_call(self, call: Call) -> None:
            raise ProxyError(429, "Rate limit reached for this key.", headers={"retry-after": "7"})

    config = make_config()
    async with gateway(config, plugin_manager=with_plugins(config, limit=Limit())) as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=openai_answer())
        r = await http.post("/v1/messages", json=MESSAGES)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert anthropic_error(r) == {"type": "rate_limit_error", "message": "Rate limit reached for this key."}
    assert not route.called


@pytest.mark.parametrize(("upstream_status", "status", "kind"), [
    (400, 400, "invalid_request_error"), (500, 502, "api_error"), (503, 503, "overloaded_error")])
async def test_upstream_failures(gateway: Callable[..., Any], upstream_status: int, status: int,
                                 kind: str) -> None:
    async with gateway() as (http, upstream):
        upstream.post(CHAT_URL).respond(upstream_status, json={"error": {"message": "down"}})
        r = await http.post("/v1/messages", json=MESSAGES)
    assert r.status_code == status
    assert anthropic_error(r)["type"] == kind
    assert_no_secret(r)


async def test_mid_stream_failure_is_an_error_event(gateway: Callable[..., Any]) -> None:
    async with gateway() as (http, _):
        r = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude", "stream": True,
                                                   "mock": {"error_after": 2}})
    assert r.status_code == 200
    events = parse_events(r.text)
    assert events[0][0] == "message_start"
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"  # a 502
    assert "message_stop" not in [n for n, _ in events]


async def test_unknown_model_is_not_found(gateway: Callable[..., Any]) -> None:
    async with gateway() as (http, _):
        r = await http.post("/v1/messages", json={**MESSAGES, "model": "no-such-model"})
    assert r.status_code == 404
    error = anthropic_error(r)
    assert error["type"] == "not_found_error" and "no-such-model" in error["message"]


@pytest.mark.parametrize(("body", "field"), [
    ({"max_tokens": 5, "messages": MESSAGES["messages"]}, "model"),
    ({"model": "gpt-test", "messages": MESSAGES["messages"]}, "max_tokens"),
    ({**MESSAGES, "messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({**MESSAGES, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "messages.0.content.0.type"),
    ({**MESSAGES, "temperature": 1.7}, "temperature"),
])
async def test_invalid_requests_are_400s_naming_the_field(gateway: Callable[..., Any], body: dict[str, Any],
                                                          field: str) -> None:
    async with gateway() as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=openai_answer())
        r = await http.post("/v1/messages", json=body)
    assert r.status_code == 400
    error = anthropic_error(r)
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{field}: ")
    assert not route.called


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]"])
async def test_bodies_that_are_not_json_objects(gateway: Callable[..., Any], content: bytes) -> None:
    async with gateway() as (http, _):
        r = await http.post("/v1/messages", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert anthropic_error(r)["type"] == "invalid_request_error"


async def test_x_api_key_authenticates(gateway: Callable[..., Any]) -> None:
    config = make_config(server={"master_key": "sk-master-test"})
    async with gateway(config) as (http, _):
        ok = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude"},
                             headers={"x-api-key": "sk-master-test"})
        wrong = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude"},
                                headers={"x-api-key": "sk-wrong"})
        missing = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude"})
        count = await http.post("/v1/messages/count_tokens", json={"model": "mock-claude",
                                                                   "messages": MESSAGES["messages"]})
    assert ok.status_code == 200, ok.text
    for r in (wrong, missing, count):
        assert r.status_code == 401
        assert anthropic_error(r)["type"] == "authentication_error"
    assert_no_secret(wrong, "sk-wrong")


async def test_stages_see_an_anthropic_call(gateway: Callable[..., Any]) -> None:
    """Every stage runs for /v1/messages calls: before_call sees the translated body."""
    seen: list[Call] = []

    class Stage:
        @hookimpl
        def aiproxy_before_call(self, call: Call) -> None:
            seen.append(call)

    errors = Errors()
    config = make_config()
    plugins = with_plugins(config, stage=Stage(), errors=errors)
    async with gateway(config, plugin_manager=plugins) as (http, _):
        ok = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude"})
        failed = await http.post("/v1/messages", json={**MESSAGES, "model": "mock-claude",
                                                        "mock": {"error": 429}})
    assert ok.status_code == 200 and failed.status_code == 429
    assert [c.ingress for c in seen] == ["anthropic", "anthropic"]
    assert seen[0].body["messages"] == [{"role": "user", "content": "Say hi"}]
    assert seen[0].state["messages"]["max_tokens"] == 100  # the client's own request
    assert [e.status for _, e in errors.seen] == [429]


# ---------------------------------------------------------------- count_tokens
async def test_count_tokens_matches_what_the_call_reports(gateway: Callable[..., Any]) -> None:
    request = {"model": "mock-claude", "system": "You count.", "tools": [WEATHER],
               "messages": [{"role": "user", "content": "How many tokens is this prompt?"},
                            {"role": "assistant", "content": "Some."},
                            {"role": "user", "content": [{"type": "text", "text": "Exactly?"}]}]}
    async with gateway() as (http, _):
        counted = await http.post("/v1/messages/count_tokens", json=request)
        created = await http.post("/v1/messages", json={**request, "max_tokens": 20,
                                                         "tool_choice": {"type": "none"}})
    assert counted.status_code == 200, counted.text
    assert counted.json() == {"input_tokens": created.json()["usage"]["input_tokens"]}
    assert counted.json()["input_tokens"] > 0


async def test_count_tokens_asks_the_deployment_routed_to_the_caller(gateway: Callable[..., Any]) -> None:
    """A model's ``route:`` rules pick the deployment that counts, as they pick the one that answers."""
    class ProCaller:
        @hookimpl
        def aiproxy_authenticate(self, call: Call) -> Principal:
            return Principal(id="k1", tier="pro")

    config = make_config(models=[{"name": "routed", "provider": "mock", "route": {"tier": ["pro"]}},
                                 {"name": "routed", "provider": "openai", "model": "gpt-4o-mini"}])
    async with gateway(config, plugin_manager=with_plugins(config, caller=ProCaller())) as (http, _):
        r = await http.post("/v1/messages/count_tokens", json={"model": "routed",
                                                               "messages": MESSAGES["messages"]})
    assert r.status_code == 200, r.text  # the mock (the pro tier's) counts; openai cannot
    assert r.json()["input_tokens"] > 0


async def test_count_tokens_on_a_provider_that_cannot(gateway: Callable[..., Any]) -> None:
    async with gateway() as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=openai_answer())
        r = await http.post("/v1/messages/count_tokens", json={"model": "gpt-test",
                                                               "messages": MESSAGES["messages"]})
        bad = await http.post("/v1/messages/count_tokens", json={"model": "gpt-test"})
    assert r.status_code == 400
    error = anthropic_error(r)
    assert error["type"] == "invalid_request_error" and "'openai'" in error["message"]
    assert "token counting" in error["message"]
    assert not route.called
    assert bad.status_code == 400 and anthropic_error(bad)["message"].startswith("messages: ")
