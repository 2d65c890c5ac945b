"""The anthropic provider: OpenAI chat requests → the Messages API and its answers back.

Upstream answers come from ``tests/fixtures/anthropic/`` (the documented wire format,
checked against the ``anthropic`` SDK's own types first), served through respx.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pydantic
import pytest
import respx
from anthropic.types import ErrorResponse, Message, ModelInfo, RawMessageStreamEvent

from aiproxy import hookimpl
from aiproxy.call import Call
from aiproxy.config import Config, PluginsConfig, load_config
from aiproxy.errors import ProxyError
from tests.conftest import make_config
from tests.helpers import assert_no_secret, error_of, with_plugins

BASE = "https://api.anthropic.test/v1"
URL = f"{BASE}/messages"
KEY = "sk-ant-upstream-secret-456"
MODEL = "claude-sonnet-4-5-20250929"
FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
HI = [{"role": "user", "content": "Say hi"}]
STREAM = {"messages": HI, "stream": True}
WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}}}

Gateway = Callable[..., Any]


def anthropic_config(options: dict[str, Any] | None = None, model_options: dict[str, Any] | None = None,
                     api_key: str | None = KEY) -> Config:
    return make_config(
        providers={"anthropic": {"plugin": "anthropic", "api_base": BASE, "api_key": api_key,
                                 "options": options or {}}},
        models=[{"name": "claude-test", "provider": "anthropic", "model": MODEL,
                 "options": model_options or {}, "retries": 0},  # one upstream answer a test, no retries
                {"name": "claude-*", "provider": "anthropic", "retries": 0}])


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


def ok(name: str) -> httpx.Response:
    return httpx.Response(200, json=fixture(name))


def sse_fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


async def _pieces(raw: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), size):  # odd sizes: events split across reads
        yield raw[i:i + size]


def streamed(raw: bytes, size: int = 37) -> Callable[[httpx.Request], httpx.Response]:
    """A respx side effect answering with ``raw`` as a stream: a new one each time (retries)."""
    return lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                          content=_pieces(raw, size))


def sent(route: respx.Route) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(route.calls.last.request.content)
    return body


def events(r: httpx.Response) -> list[Any]:
    """The payloads of the gateway's SSE answer, ``[DONE]`` as the string."""
    assert r.headers["content-type"].startswith("text/event-stream")
    out: list[Any] = []
    for block in r.text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chunks(r: httpx.Response) -> list[dict[str, Any]]:
    got = events(r)
    assert got[-1] == "[DONE]", got[-1]
    return got[:-1]


class Finished:
    """Keeps the calls that reach after_call, for their usage."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        self.calls.append(call)


async def chat(gateway: Gateway, upstream_answer: Any, body: dict[str, Any], cfg: Config | None = None,
               ) -> tuple[httpx.Response, respx.Route]:
    async with gateway(cfg or anthropic_config()) as (http, upstream):
        route = upstream.post(URL).mock(side_effect=upstream_answer) if callable(upstream_answer) \
            else upstream.post(URL).mock(return_value=upstream_answer)
        r = await http.post("/v1/chat/completions", json={"model": "claude-test", **body})
    return r, route


# ---------------------------------------------------------------- the fixtures are real shapes
def test_fixtures_are_what_the_sdk_parses() -> None:
    for path in FIXTURES.glob("message_*.json"):
        Message.model_validate(json.loads(path.read_text()))
    for path in FIXTURES.glob("error_*.json"):
        ErrorResponse.model_validate(json.loads(path.read_text()))
    stream_event: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RawMessageStreamEvent)
    seen = set()
    for path in FIXTURES.glob("*.sse"):
        for line in path.read_text().splitlines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                seen.add(event["type"])
                if event["type"] == "error":
                    ErrorResponse.model_validate(event)
                elif event["type"] != "ping":
                    stream_event.validate_python(event)
    assert {"message_start", "content_block_start", "content_block_delta", "content_block_stop",
            "message_delta", "message_stop", "ping", "error"} <= seen


# ---------------------------------------------------------------- whole answers
async def test_plain_chat_request_and_answer(gateway: Gateway) -> None:
    r, route = await chat(gateway, ok("message_text.json"), {"messages": HI})
    assert r.status_code == 200, r.text
    request = route.calls.last.request
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert sent(route) == {"model": MODEL, "max_tokens": 4096,
                           "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]}
    body = r.json()
    assert body["id"] == "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
    assert body["object"] == "chat.completion" and isinstance(body["created"], int) and body["created"] > 0
    assert body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hello! How can I help you today?", "refusal": None}}]
    # input 12 + cache read 2000 + cache write 100
    assert body["usage"] == {"prompt_tokens": 2112, "completion_tokens": 10, "total_tokens": 2122,
                             "prompt_tokens_details": {"cached_tokens": 2000, "cache_write_tokens": 100}}


async def test_usage_is_exact_for_the_gateway(gateway: Gateway) -> None:
    finished = Finished()
    cfg = anthropic_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, finished=finished)) as (http, upstream):
        upstream.post(URL).respond(200, json=fixture("message_text.json"))
        r = await http.post("/v1/chat/completions", json={"model": "claude-test", "messages": HI})
        assert r.is_success
    usage = finished.calls[0].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cached_tokens,
            usage.cache_write_tokens) == (2112, 10, 2122, 2000, 100)


async def test_system_developer_and_turns(gateway: Gateway) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Are you there?"}]},
        {"role": "assistant", "content": "Oui."},
        {"role": "assistant", "content": [{"type": "text", "text": "Bonjour."}]},
        {"role": "user", "content": "Thanks"},
    ]
    r, route = await chat(gateway, ok("message_text.json"), {"messages": messages})
    assert r.status_code == 200, r.text
    body = sent(route)
    assert body["system"] == [text("Be brief."), text("Answer in French.")]
    assert body["messages"] == [
        {"role": "user", "content": [text("Hello"), text("Are you there?")]},
        {"role": "assistant", "content": [text("Oui."), text("Bonjour.")]},
        {"role": "user", "content": [text("Thanks")]},
    ]


async def test_one_system_message_is_a_string(gateway: Gateway) -> None:
    r, route = await chat(gateway, ok("message_text.json"),
                          {"messages": [{"role": "system", "content": "Be brief."}, *HI]})
    assert r.status_code == 200 and sent(route)["system"] == "Be brief."


@pytest.mark.parametrize(("given", "expected"), [
    ({"max_tokens": 50}, 50),
    ({"max_completion_tokens": 70, "max_tokens": 50}, 70),
    ({}, 1234),
])
async def test_max_tokens(gateway: Gateway, given: dict[str, Any], expected: int) -> None:
    r, route = await chat(gateway, ok("message_text.json"),
                          {"messages": HI, **given}, anthropic_config({"max_tokens": 1234}))
    assert r.status_code == 200 and sent(route)["max_tokens"] == expected


async def test_sampling_stop_user_and_native_fields(gateway: Gateway) -> None:
    r, route = await chat(gateway, ok("message_text.json"), {
        "messages": HI, "temperature": 0.3, "top_p": 0.9, "stop": "END", "user": "user-42", "n": 1,
        "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 2048}})
    assert r.status_code == 200, r.text
    body = sent(route)
    assert (body["temperature"], body["top_p"], body["stop_sequences"]) == (0.3, 0.9, ["END"])
    assert body["metadata"] == {"user_id": "user-42"}
    assert body["top_k"] == 5 and body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert "n" not in body and "user" not in body and "stop" not in body


async def test_fields_without_an_equivalent_are_dropped_with_a_debug_log(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aiproxy.anthropic")
    r, route = await chat(gateway, ok("message_text.json"), {
        "messages": HI, "seed": 7, "frequency_penalty": 0.5, "presence_penalty": 0.1, "store": True,
        "metadata": {"a": "b"}, "logprobs": False, "stream_options": {"include_usage": True},
        "something_new": 1, "modalities": ["text"]})
    assert r.status_code == 200, r.text
    body = sent(route)
    assert set(body) == {"model", "messages", "max_tokens"}
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    for name in ("seed", "frequency_penalty", "presence_penalty", "store", "metadata", "something_new"):
        assert name in logged


async def test_a_models_drop_params_and_extra_fields(gateway: Gateway) -> None:
    cfg = anthropic_config(model_options={"drop_params": ["temperature"], "extra_fields": ["inference_geo"]})
    r, route = await chat(gateway, ok("message_text.json"),
                          {"messages": HI, "temperature": 0.2, "top_p": 0.5, "inference_geo": "eu"}, cfg)
    assert r.status_code == 200, r.text
    body = sent(route)
    assert "temperature" not in body and body["top_p"] == 0.5 and body["inference_geo"] == "eu"


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"),
    ({"temperature": 1.5}, "temperature"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"reasoning_effort": ["high"]}, "reasoning_effort"),  # not a string: a 400, not a 500
    ({"web_search_options": {}}, None),  # {} asks for nothing
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
])
async def test_unsupported_fields_are_a_400_naming_them(gateway: Gateway, extra: dict[str, Any],
                                                        param: str | None) -> None:
    r, route = await chat(gateway, ok("message_text.json"), {"messages": HI, **extra})
    if param is None:
        assert r.status_code == 200
        return
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == param
    assert param.split("[")[0] in error["message"] or "Anthropic" in error["message"]
    assert not route.called


async def test_response_format_json_schema(gateway: Gateway) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r, route = await chat(gateway, ok("message_text.json"), {
        "messages": HI, "reasoning_effort": "minimal",
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "city", "schema": schema, "strict": True}}})
    assert r.status_code == 200, r.text
    assert sent(route)["output_config"] == {"format": {"type": "json_schema", "schema": schema},
                                            "effort": "low"}


# ---------------------------------------------------------------- tools
@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    (None, None, None),
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None,
     {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
])
async def test_tools_and_tool_choice(gateway: Gateway, choice: Any, parallel: Any, expected: Any) -> None:
    body: dict[str, Any] = {"messages": HI, "tools": [WEATHER]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    r, route = await chat(gateway, ok("message_tool_use.json"), body)
    assert r.status_code == 200, r.text
    out = sent(route)
    assert out["tools"] == [{"name": "get_weather", "description": "Current weather",
                             "input_schema": WEATHER["function"]["parameters"]}]
    assert out.get("tool_choice") == expected


async def test_tool_use_answer_is_parallel_tool_calls(gateway: Gateway) -> None:
    r, _ = await chat(gateway, ok("message_tool_use.json"),
                      {"messages": HI, "tools": [WEATHER]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == "I'll check the weather in both cities."
    calls = message["tool_calls"]
    assert [c["id"] for c in calls] == ["toolu_01A09q90qw90lq917835lq9", "toolu_01B2xk4n8s7d6f5g4h3j2k1"]
    assert all(c["type"] == "function" and c["function"]["name"] == "get_weather" for c in calls)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == \
        [{"location": "Paris"}, {"location": "Oslo", "unit": "celsius"}]
    assert all(isinstance(c["function"]["arguments"], str) for c in calls)


async def test_tool_calls_and_results_go_back_as_blocks(gateway: Gateway) -> None:
    """Tool results become tool_result blocks of one user turn, ahead of its text."""
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "user", "content": "Which is warmer?"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "9C"}]},
    ]
    r, route = await chat(gateway, ok("message_text.json"),
                          {"messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    assert sent(route)["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "9C"}]},
            {"type": "text", "text": "Which is warmer?"}]},
    ]


async def test_bad_tool_call_arguments_are_a_400(gateway: Gateway) -> None:
    messages = [*HI, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    r, route = await chat(gateway, ok("message_text.json"), {"messages": messages})
    assert r.status_code == 400
    assert error_of(r)["param"] == "messages[1].tool_calls[0].function.arguments"
    assert not route.called


# ---------------------------------------------------------------- images and files
async def test_images_by_data_url_and_by_url(gateway: Gateway) -> None:
    content = [{"type": "text", "text": "Compare"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
               {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
               {"type": "file",
                "file": {"file_data": "data:application/pdf;base64,JVBERi0x", "filename": "a.pdf"}}]
    r, route = await chat(gateway, ok("message_text.json"),
                          {"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    assert sent(route)["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "document", "title": "a.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
    ]


@pytest.mark.parametrize("url", ["data:image/bmp;base64,Qk0=", "ftp://example.com/x.png",
                                 "data:image/png,raw"])
async def test_images_anthropic_cannot_take_are_a_400(gateway: Gateway, url: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    r, _ = await chat(gateway, ok("message_text.json"),
                      {"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400
    assert error_of(r)["param"] == "messages[0].content[0].image_url.url"


# ---------------------------------------------------------------- finish reasons
@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("model_context_window_exceeded", "length"),
])
async def test_finish_reasons(gateway: Gateway, stop_reason: str, finish: str) -> None:
    message = {**fixture("message_text.json"), "stop_reason": stop_reason}
    r, _ = await chat(gateway, httpx.Response(200, json=message), {"messages": HI})
    assert r.json()["choices"][0]["finish_reason"] == finish
    stream = sse_fixture("stream_text.sse").replace(b'"stop_reason":"end_turn"',
                                                    f'"stop_reason":"{stop_reason}"'.encode())
    r, _ = await chat(gateway, streamed(stream), {"messages": HI, "stream": True})
    assert [c["choices"][0]["finish_reason"] for c in chunks(r)
            if c["choices"][0]["finish_reason"]] == [finish]


async def test_thinking_is_reasoning_content(gateway: Gateway) -> None:
    r, _ = await chat(gateway, ok("message_thinking.json"), {"messages": HI})
    message = r.json()["choices"][0]["message"]
    assert message["content"] == "42"
    assert message["reasoning_content"] == "The user wants a number. 6 times 7 is 42."
    r, _ = await chat(gateway, streamed(sse_fixture("stream_thinking.sse")), {"messages": HI, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in chunks(r)]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "6 times 7 is 42."
    assert "".join(d.get("content") or "" for d in deltas) == "42"


# ---------------------------------------------------------------- streams
@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_text(gateway: Gateway, include_usage: bool) -> None:
    finished = Finished()
    cfg = anthropic_config()
    body: dict[str, Any] = {"model": "claude-test", "messages": HI, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with gateway(cfg, plugin_manager=with_plugins(cfg, finished=finished)) as (http, upstream):
        route = upstream.post(URL).mock(side_effect=streamed(sse_fixture("stream_text.sse")))
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert sent(route)["stream"] is True and "stream_options" not in sent(route)
    got = chunks(r)
    assert {c["id"] for c in got} == {"chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"}
    assert len({c["created"] for c in got}) == 1 and {c["model"] for c in got} == {MODEL}
    assert all(c["object"] == "chat.completion.chunk" for c in got)
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    with_choices = [c for c in got if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices) == "Hello, world!"
    assert [c["choices"][0]["finish_reason"] for c in with_choices][-1] == "stop"
    usage = {"prompt_tokens": 36, "completion_tokens": 15, "total_tokens": 51,
             "prompt_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 3}}
    if include_usage:
        assert got[-1]["choices"] == [] and got[-1]["usage"] == usage
    else:
        assert all("usage" not in c for c in got)
    exact = finished.calls[0].usage
    assert exact is not None
    assert (exact.prompt_tokens, exact.completion_tokens, exact.cached_tokens, exact.cache_write_tokens) == \
        (36, 15, 8, 3)


async def test_stream_tool_calls_keep_their_indexes(gateway: Gateway) -> None:
    r, _ = await chat(gateway, streamed(sse_fixture("stream_tool_use.sse"), size=50),
                      {"messages": HI, "tools": [WEATHER], "stream": True})
    assert r.status_code == 200, r.text
    calls: dict[int, dict[str, str]] = {}
    for c in chunks(r):
        for tc in c["choices"][0]["delta"].get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            if "id" in tc:
                assert not call["id"], "an id is sent once, with the call's first delta"
                call["id"] = tc["id"]
                assert tc["type"] == "function"
            call["name"] += tc["function"].get("name") or ""
            call["arguments"] += tc["function"].get("arguments") or ""
    assert sorted(calls) == [0, 1]
    assert [calls[i]["id"] for i in (0, 1)] == \
        ["toolu_01T1x1fJ34qAmk2tNTrN7Up6", "toolu_02U2y2gK45rBnl3uOUsO8Vq7"]
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == \
        [{"location": "Paris"}, {"location": "Oslo", "unit": "celsius"}]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks(r) if c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks(r))
    assert text == "Checking both cities."


async def test_stream_error_event_mid_stream_ends_with_an_error_event(gateway: Gateway) -> None:
    r, _ = await chat(gateway, streamed(sse_fixture("stream_overloaded.sse")), STREAM)
    assert r.status_code == 200
    got = events(r)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in got[:-1]) == "Partial"
    assert got[-1]["error"]["type"] == "service_unavailable"
    assert "overloaded" in got[-1]["error"]["message"].lower()


async def test_stream_error_event_first_is_an_http_error(gateway: Gateway) -> None:
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",' \
            b'"message":"Overloaded"}}\n\n'
    r, _ = await chat(gateway, streamed(error), STREAM)
    assert r.status_code == 503
    assert error_of(r)["code"] == "upstream_unavailable"


async def test_stream_cut_short_ends_with_an_error_event(gateway: Gateway) -> None:
    raw = sse_fixture("stream_text.sse")
    r, _ = await chat(gateway, streamed(raw[:raw.index(b"event: message_delta")]), STREAM)
    got = events(r)
    assert got[-1]["error"]["code"] == "upstream_bad_response"
    assert "message_stop" in got[-1]["error"]["message"]


async def test_bad_request_fails_before_any_stream(gateway: Gateway) -> None:
    r, route = await chat(gateway, streamed(sse_fixture("stream_text.sse")), {**STREAM, "n": 3})
    assert r.status_code == 400 and error_of(r)["param"] == "n"
    assert not route.called


# ---------------------------------------------------------------- upstream errors
@pytest.mark.parametrize(("status", "name", "expected", "etype"), [
    (529, "error_overloaded.json", 503, "service_unavailable"),
    (429, "error_rate_limit.json", 429, "rate_limit_error"),
    (400, "error_invalid_request.json", 400, "invalid_request_error"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors(gateway: Gateway, status: int, name: str, expected: int, etype: str,
                               stream: bool) -> None:
    answer = httpx.Response(status, json=fixture(name), headers={"retry-after": "7"} if status == 429 else {})
    r, _ = await chat(gateway, answer, {"messages": HI, "stream": stream})
    assert r.status_code == expected
    error = error_of(r)
    assert error["type"] == etype
    upstream_message = fixture(name)["error"]["message"]
    assert upstream_message in error["message"]
    if status == 429:
        assert r.headers["retry-after"] == "7"
    assert_no_secret(r, KEY)


async def test_upstream_key_never_reaches_the_client(gateway: Gateway,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {"type": "error", "error": {"type": "invalid_request_error",
                                       "message": f"bad key {KEY} in request"}}
    r, _ = await chat(gateway, httpx.Response(400, json=echo), {"messages": HI})
    assert r.status_code == 400 and "[redacted]" in error_of(r)["message"]
    assert_no_secret(r, KEY)
    r, _ = await chat(gateway, httpx.Response(401, json={"type": "error", "error": {
        "type": "authentication_error", "message": f"invalid x-api-key {KEY}"}}), {"messages": HI})
    assert r.status_code == 502 and error_of(r)["code"] == "upstream_auth_failed"
    assert_no_secret(r, KEY)
    assert KEY not in caplog.text


# ---------------------------------------------------------------- headers, models, tokens, config
async def test_beta_and_version_headers(gateway: Gateway) -> None:
    cfg = anthropic_config({"anthropic_version": "2024-01-01", "anthropic_beta": ["a-2025", "b-2025"]},
                           model_options={"anthropic_beta": "model-beta"})
    async with gateway(cfg) as (http, upstream):
        route = upstream.post(URL).respond(200, json=fixture("message_text.json"))
        await http.post("/v1/chat/completions", json={"model": "claude-test", "messages": HI})
        model_headers = route.calls.last.request.headers
        await http.post("/v1/chat/completions", json={"model": "claude-other", "messages": HI})
        provider_headers = route.calls.last.request.headers
    assert model_headers["anthropic-version"] == "2024-01-01"
    assert model_headers["anthropic-beta"] == "model-beta"
    assert provider_headers["anthropic-beta"] == "a-2025,b-2025"
    assert orjson.loads(route.calls.last.request.content)["model"] == "claude-other"


async def test_wildcard_models_are_listed(gateway: Gateway) -> None:
    pages: list[dict[str, Any]] = [
             {"data": [{"type": "model", "id": "claude-opus-4-5", "display_name": "Opus",
                        "created_at": "2025-11-01T00:00:00Z", "lifecycle": "active"}],
              "has_more": True, "first_id": "claude-opus-4-5", "last_id": "claude-opus-4-5"},
             {"data": [{"type": "model", "id": "claude-haiku-4-5", "display_name": "Haiku",
                        "created_at": "2025-10-01T00:00:00Z", "lifecycle": "active"}],
              "has_more": False, "first_id": "claude-haiku-4-5", "last_id": "claude-haiku-4-5"}]
    for page in pages:
        for model in page["data"]:
            ModelInfo.model_validate(model)
    async with gateway(anthropic_config()) as (http, upstream):
        route = upstream.get(f"{BASE}/models").mock(side_effect=[httpx.Response(200, json=p) for p in pages])
        ids = {m["id"] for m in (await http.get("/v1/models")).json()["data"]}
    assert {"claude-test", "claude-opus-4-5", "claude-haiku-4-5"} <= ids
    assert route.calls[1].request.url.params["after_id"] == "claude-opus-4-5"
    assert route.calls[0].request.headers["x-api-key"] == KEY


async def test_count_tokens(gateway: Gateway) -> None:
    """/v1/messages/count_tokens asks the upstream's count_tokens with the prompt only."""
    tool = {"name": "get_weather", "description": "Current weather",
            "input_schema": WEATHER["function"]["parameters"]}
    async with gateway(anthropic_config()) as (http, upstream):
        route = upstream.post(f"{BASE}/messages/count_tokens").respond(200, json={"input_tokens": 31})
        r = await http.post("/v1/messages/count_tokens", json={
            "model": "claude-test", "system": "Be brief.", "tools": [tool],
            "messages": [{"role": "user", "content": "Say hi"}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"input_tokens": 31}
    assert route.calls.last.request.headers["x-api-key"] == KEY
    assert sent(route) == {"model": MODEL, "system": "Be brief.", "tools": [tool],
                           "messages": [{"role": "user", "content": [text("Say hi")]}]}


async def test_count_tokens_runs_the_before_call_stages(gateway: Gateway) -> None:
    """A tenant's own key (set by a before-call stage) counts, as it answers; a stage's
    refusal refuses the count too."""
    class TenantKey:
        @hookimpl
        def aiproxy_before_call(self, call: Call) -> None:
            if call.state["messages"].get("metadata", {}).get("user_id") == "blocked":
                raise ProxyError(429, "over the limit", type="rate_limit_error")
            call.credentials = {"anthropic": "sk-ant-tenant-own-789"}

    config = anthropic_config()
    body = {"model": "claude-test", "messages": [{"role": "user", "content": "Say hi"}]}
    async with gateway(config, plugin_manager=with_plugins(config, tenant=TenantKey())) as (http, upstream):
        route = upstream.post(f"{BASE}/messages/count_tokens").respond(200, json={"input_tokens": 9})
        r = await http.post("/v1/messages/count_tokens", json=body)
        refused = await http.post("/v1/messages/count_tokens",
                                  json={**body, "metadata": {"user_id": "blocked"}})
    assert r.status_code == 200, r.text
    assert route.calls.last.request.headers["x-api-key"] == "sk-ant-tenant-own-789"
    assert refused.status_code == 429 and route.call_count == 1


async def test_without_a_key_the_provider_is_left_out(gateway: Gateway) -> None:
    async with gateway(anthropic_config(api_key=None)) as (http, _):
        r = await http.post("/v1/chat/completions", json={"model": "claude-test", "messages": HI})
    assert r.status_code == 404
    assert "api_key" in error_of(r)["message"]


async def test_the_shipped_config_serves_claude_with_a_key(gateway: Gateway) -> None:
    shipped = load_config(Path(__file__).parent.parent / "config.yaml", env={"ANTHROPIC_API_KEY": KEY})
    cfg = Config(providers={"anthropic": shipped.providers["anthropic"]},
                 models=[m for m in shipped.models if m.provider == "anthropic"], plugins=PluginsConfig())
    async with gateway(cfg) as (http, upstream):
        route = upstream.post("https://api.anthropic.com/v1/messages").mock(return_value=ok("message_text.json"))
        for model in ("claude-sonnet-4-5", "claude-opus-4-5"):
            r = await http.post("/v1/chat/completions", json={"model": model, "messages": HI})
            assert r.status_code == 200, r.text
            assert sent(route)["model"] == model and sent(route)["max_tokens"] == 4096
            assert route.calls.last.request.headers["x-api-key"] == KEY


async def test_tool_ids_from_other_providers_are_made_acceptable(gateway: Gateway) -> None:
    """Anthropic takes ids of [a-zA-Z0-9_-] only; a call and its result must still match."""
    foreign = "call_1~ts~c2lnbmF0dXJl/+="
    messages = [*HI, {"role": "assistant", "tool_calls": [
        {"id": foreign, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": foreign, "content": "18C"}]
    r, route = await chat(gateway, ok("message_text.json"), {"messages": messages, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    turns = sent(route)["messages"]
    used, result = turns[1]["content"][0]["id"], turns[2]["content"][0]["tool_use_id"]
    assert used == result == "call_1_ts_c2lnbmF0dXJl___"


async def test_only_system_messages_are_a_400(gateway: Gateway) -> None:
    only_system = {"messages": [{"role": "system", "content": "x"}]}
    r, route = await chat(gateway, ok("message_text.json"), only_system)
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    assert not route.called


async def test_a_whole_answer_to_a_stream_request_is_replayed_as_chunks(gateway: Gateway) -> None:
    r, _ = await chat(gateway, ok("message_tool_use.json"), {**STREAM, "tools": [WEATHER],
                                                             "stream_options": {"include_usage": True}})
    got = chunks(r)
    deltas = [c["choices"][0]["delta"] for c in got if c["choices"]]
    assert deltas[0]["content"] == "I'll check the weather in both cities."
    assert [tc["index"] for tc in deltas[0]["tool_calls"]] == [0, 1]
    assert got[-1]["choices"] == [] and got[-1]["usage"]["prompt_tokens"] == 480


async def test_rate_limit_error_event_mid_stream(gateway: Gateway) -> None:
    raw = sse_fixture("stream_overloaded.sse").replace(b'"overloaded_error","message":"Overloaded"',
                                                       b'"rate_limit_error","message":"Slow down"')
    r, _ = await chat(gateway, streamed(raw), STREAM)
    last = events(r)[-1]
    assert last["error"]["type"] == "rate_limit_error" and last["error"]["message"] == "Slow down"
