"""The mock provider: deterministic answers, tool calls, streams, embeddings, injected faults."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from aiproxy.wire import unpack_floats
from tests.conftest import make_config

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "precise": {"type": "boolean"},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}},
            "tags": {"type": ["null", "array"]},
        }, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}}}},
]
WEATHER_ARGS = {"city": "mock", "days": 1, "unit": "celsius", "precise": True,
                "where": {"lat": 1.5}, "tags": []}


def chat(content: str = "Tell me something", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-1", "messages": [{"role": "user", "content": content}], **extra}


def chunks(text: str) -> list[dict[str, Any]]:
    """The JSON chunks of a relayed stream, checking it ends with one [DONE]."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    assert text.count("data: [DONE]") == 1
    events = text[:-2].split("\n\n")[:-1]
    return [orjson.loads(e.removeprefix("data: ")) for e in events]


def content_of(stream: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in stream if c["choices"])


async def post(http: Any, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    r = await http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- text

async def test_same_request_same_answer_different_prompt_different_answer(client):
    http, _ = client
    first = await post(http, chat("What is the gateway?"))
    again = await post(http, chat("What is the gateway?"))
    other = await post(http, chat("Something else entirely"))
    text = first["choices"][0]["message"]["content"]
    assert text == again["choices"][0]["message"]["content"]
    assert text != other["choices"][0]["message"]["content"]
    assert first["id"] != again["id"]
    assert first["object"] == "chat.completion"
    assert first["choices"][0]["finish_reason"] == "stop"


async def test_answers_are_the_same_across_gateways(gateway):
    async with gateway() as (http, _):
        a = await post(http, chat("stable across restarts"))
    async with gateway() as (http, _):
        b = await post(http, chat("stable across restarts"))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


async def test_tokens_sets_length_and_usage(client):
    http, _ = client
    data = await post(http, chat(mock={"tokens": 7}))
    words = data["choices"][0]["message"]["content"].split(" ")
    assert len(words) == 7
    usage = data["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    default = await post(http, chat())
    assert default["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize(("tokens", "chunk_size", "content_chunks"), [(10, 3, 4), (6, 1, 6), (5, 10, 1)])
async def test_stream_tokens_and_chunk_size(client, tokens, chunk_size, content_chunks):
    http, _ = client
    options = {"tokens": tokens, "chunk_size": chunk_size}
    r = await http.post("/v1/chat/completions", json=chat(
        "stream me", stream=True, stream_options={"include_usage": True}, mock=options))
    assert r.status_code == 200
    stream = chunks(r.text)
    assert stream[0]["choices"][0]["delta"]["role"] == "assistant"
    with_content = [c for c in stream if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(with_content) == content_chunks
    assert [c["choices"][0]["finish_reason"] for c in stream if c["choices"]][-1] == "stop"
    assert stream[-1]["choices"] == []
    assert stream[-1]["usage"]["completion_tokens"] == tokens
    assert all(c["object"] == "chat.completion.chunk" for c in stream)
    assert len({c["id"] for c in stream}) == 1
    # The stream says what the whole answer says.
    whole = await post(http, chat("stream me", mock=options))
    assert content_of(stream) == whole["choices"][0]["message"]["content"]


async def test_stream_without_include_usage_has_no_usage_chunk(client):
    http, _ = client
    r = await http.post("/v1/chat/completions", json=chat(stream=True, mock={"tokens": 3}))
    stream = chunks(r.text)
    assert all(c["choices"] for c in stream)
    assert all("usage" not in c for c in stream)


async def test_reply_option_and_model_options(gateway):
    cfg = make_config(
        providers={"mock": {"plugin": "mock", "options": {"reply": "from the provider", "tokens": 3}}},
        models=[{"name": "mock-fixed", "provider": "mock", "options": {"reply": "from the model"}},
                {"name": "mock-*", "provider": "mock"}])
    async with gateway(cfg) as (http, _):
        fixed = await post(http, {**chat(), "model": "mock-fixed"})
        other = await post(http, {**chat(), "model": "mock-other"})
        asked = await post(http, {**chat(), "model": "mock-other", "mock": {"reply": "from the request"}})
    assert fixed["choices"][0]["message"]["content"] == "from the model"
    assert other["choices"][0]["message"]["content"] == "from the provider"
    assert asked["choices"][0]["message"]["content"] == "from the request"


async def test_n_gives_that_many_different_choices(client):
    http, _ = client
    data = await post(http, chat(n=2, mock={"tokens": 8}))
    choices = data["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["message"]["content"] != choices[1]["message"]["content"]
    assert data["usage"]["completion_tokens"] == 16


async def test_wildcard_model_routes_to_mock_and_echoes_the_name(client):
    http, _ = client
    data = await post(http, {**chat(), "model": "mock-anything-at-all"})
    assert data["model"] == "mock-anything-at-all"
    r = await http.post("/v1/chat/completions", json={**chat(stream=True), "model": "mock-streamer"})
    assert {c["model"] for c in chunks(r.text)} == {"mock-streamer"}
    r = await http.post("/v1/chat/completions", json={**chat(), "model": "mock-"})
    assert r.status_code == 404  # the wildcard must match something


async def test_completions(client):
    http, _ = client
    data = await post(http, {"model": "mock-text", "prompt": "Once upon", "mock": {"tokens": 5}},
                      "/v1/completions")
    assert data["object"] == "text_completion"
    assert len(data["choices"][0]["text"].split(" ")) == 5
    assert data["usage"]["completion_tokens"] == 5
    r = await http.post("/v1/completions", json={"model": "mock-text", "prompt": "Once upon", "stream": True,
                                                 "mock": {"tokens": 5}})
    stream = chunks(r.text)
    assert "".join(c["choices"][0]["text"] for c in stream) == data["choices"][0]["text"]
    assert stream[-1]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- tool calls

async def test_tool_call_built_from_schema(client):
    http, _ = client
    data = await post(http, chat("Weather in Paris?", tools=TOOLS))
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)
    assert orjson.loads(call["function"]["arguments"]) == WEATHER_ARGS


async def test_tool_choice_names_the_tool_and_all_calls_every_tool(client):
    http, _ = client
    choice = {"type": "function", "function": {"name": "get_time"}}
    named = await post(http, chat(tools=TOOLS, tool_choice=choice))
    [call] = named["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    assert orjson.loads(call["function"]["arguments"]) == {"zone": "mock"}
    every = await post(http, chat(tools=TOOLS, mock={"tool_call": "all"}))
    calls = every["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert len({c["id"] for c in calls}) == 2


async def test_after_tool_result_the_answer_is_text(client):
    http, _ = client
    first = await post(http, chat("Weather in Paris?", tools=TOOLS))
    call = first["choices"][0]["message"]["tool_calls"][0]
    body = {"model": "mock-1", "tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]}
    data = await post(http, body)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"]


@pytest.mark.parametrize("extra", [{"tool_choice": "none"}, {"mock": {"tool_call": False}}, {"tools": []}])
async def test_no_tool_call_when_told_not_to(client, extra):
    http, _ = client
    data = await post(http, {**chat("Weather?", tools=TOOLS), **extra})
    assert data["choices"][0]["finish_reason"] == "stop"
    assert isinstance(data["choices"][0]["message"]["content"], str)


async def test_streamed_tool_call_deltas(client):
    http, _ = client
    r = await http.post("/v1/chat/completions", json=chat(
        "Weather?", tools=TOOLS, stream=True, mock={"tool_call": "all"}))
    assert r.status_code == 200
    stream = chunks(r.text)
    deltas = [c["choices"][0]["delta"] for c in stream if c["choices"]]
    assert deltas[0]["role"] == "assistant"
    pieces: dict[int, list[dict[str, Any]]] = {}
    for delta in deltas:
        for tc in delta.get("tool_calls") or []:
            pieces.setdefault(tc["index"], []).append(tc)
    assert sorted(pieces) == [0, 1]
    expected = {0: ("get_weather", WEATHER_ARGS), 1: ("get_time", {"zone": "mock"})}
    for index, parts in pieces.items():
        head, rest = parts[0], parts[1:]
        assert head["id"].startswith("call_") and head["type"] == "function"
        assert head["function"]["name"] == expected[index][0]
        assert rest, "arguments arrive in later deltas"
        assert all("id" not in p and "name" not in p["function"] for p in rest)
        arguments = "".join(p["function"]["arguments"] for p in parts)
        assert orjson.loads(arguments) == expected[index][1]
    finishes = [c["choices"][0]["finish_reason"] for c in stream if c["choices"]]
    assert finishes[-1] == "tool_calls"
    assert finishes[:-1] == [None] * (len(finishes) - 1)


# ---------------------------------------------------------------- faults

@pytest.mark.parametrize(("status", "expected"), [(429, 429), (500, 502), (503, 503), (529, 503), (400, 400)])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_error_injection(client, status, expected, stream):
    http, _ = client
    r = await http.post("/v1/chat/completions", json=chat(stream=stream, mock={"error": status}))
    assert r.status_code == expected
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_retry_after_injection(client):
    http, _ = client
    r = await http.post("/v1/chat/completions", json=chat(mock={"error": 429, "retry_after": 3}))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limit_error"
    r = await http.post("/v1/embeddings", json={"model": "mock-e", "input": "x",
                                                "mock": {"error": 503, "retry_after": 5}})
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"


async def _error_pattern(gateway: Any, seed: int, calls: int) -> list[int]:
    cfg = make_config(providers={"mock": {"plugin": "mock", "options": {
        "seed": seed, "error": 503, "error_rate": 0.25}}}, models=[{"name": "mock-*", "provider": "mock"}])
    async with gateway(cfg) as (http, _):
        return [(await http.post("/v1/chat/completions", json=chat())).status_code for _ in range(calls)]


async def test_error_rate_fails_about_that_share_reproducibly(gateway):
    statuses = await _error_pattern(gateway, seed=7, calls=200)
    assert set(statuses) == {200, 503}
    assert 25 <= statuses.count(503) <= 75  # 25% of 200 is 50
    assert await _error_pattern(gateway, seed=7, calls=200) == statuses
    assert await _error_pattern(gateway, seed=8, calls=200) != statuses


# ---------------------------------------------------------------- embeddings

async def test_embeddings_float_and_base64_agree_and_are_unit_length(client):
    http, _ = client
    body = {"model": "mock-embed", "input": ["alpha", "beta gamma"]}
    floats = await post(http, body, "/v1/embeddings")
    packed = await post(http, {**body, "encoding_format": "base64"}, "/v1/embeddings")
    assert floats["object"] == "list"
    assert floats["model"] == "mock-embed"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    for f, p in zip(floats["data"], packed["data"], strict=True):
        vector = f["embedding"]
        assert len(vector) == 64
        assert abs(sum(v * v for v in vector) - 1) < 1e-4
        assert isinstance(p["embedding"], str)
        assert unpack_floats(p["embedding"]) == pytest.approx(vector, abs=1e-6)
    assert floats["data"][0]["embedding"] != floats["data"][1]["embedding"]


async def test_embeddings_deterministic_and_dimensions_honoured(client):
    http, _ = client
    a = await post(http, {"model": "mock-embed", "input": "alpha", "dimensions": 20}, "/v1/embeddings")
    b = await post(http, {"model": "mock-embed", "input": ["alpha"], "dimensions": 20}, "/v1/embeddings")
    vector = a["data"][0]["embedding"]
    assert len(vector) == 20
    assert abs(sum(v * v for v in vector) - 1) < 1e-4
    assert b["data"][0]["embedding"] == vector
    tokens = await post(http, {"model": "mock-embed", "input": [1, 2, 3], "dimensions": 8}, "/v1/embeddings")
    assert len(tokens["data"]) == 1 and len(tokens["data"][0]["embedding"]) == 8
    assert tokens["usage"]["prompt_tokens"] == 3
    r = await http.post("/v1/embeddings", json={"model": "mock-embed", "input": "x", "dimensions": 100000})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "dimensions"


@pytest.mark.parametrize(("options", "param"), [
    ({"tokens": "lots"}, "mock.tokens"),
    ({"tokens": 10**9}, "mock.tokens"),   # would build a billion-word answer
    ({"tokens": -1}, "mock.tokens"),
    ({"chunk_size": 0}, "mock.chunk_size"),
    ({"error": "teapot"}, "mock.error"),
    ({"error_rate": 2}, "mock.error_rate"),
    ({"latency_ms": [1]}, "mock.latency_ms"),
    ({"retry_after": True}, "mock.retry_after"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_bad_mock_options_are_400_naming_them(client, options, param, stream):
    http, _ = client
    r = await http.post("/v1/chat/completions", json=chat(stream=stream, mock=options))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_content_parts_without_text_are_not_a_crash(client):
    http, _ = client
    parts = [{"type": "text", "text": "look"}, {"type": "text", "text": 5},
             {"type": "image_url", "image_url": {"url": "data:,"}}]
    data = await post(http, {"model": "mock-1", "messages": [{"role": "user", "content": parts}]})
    assert data["choices"][0]["message"]["content"]
    same = await post(http, chat("look"))
    assert data["choices"][0]["message"]["content"] == same["choices"][0]["message"]["content"]
