"""The Ollama provider: OpenAI requests to Ollama's native API and its answers back."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers

from aiproxy.builtin.ollama import OllamaProvider
from aiproxy.call import Call
from aiproxy.config import ModelConfig, ProviderConfig
from aiproxy.errors import ProxyError
from aiproxy.router import Deployment
from aiproxy.wire import unpack_floats
from tests.conftest import OLLAMA_BASE, make_config
from tests.helpers import GatedStream

CHAT_URL = f"{OLLAMA_BASE}/api/chat"
GENERATE_URL = f"{OLLAMA_BASE}/api/generate"
EMBED_URL = f"{OLLAMA_BASE}/api/embed"
LLAMA = {"model": "llama-test", "messages": [{"role": "user", "content": "Say hi"}]}
PNG = "iVBORw0KGgoAAAANSUhEUg=="
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def done_line(**extra: Any) -> dict[str, Any]:
    return {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
            "prompt_eval_count": 11, "eval_count": 5, **extra}


def ndjson(*lines: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


class Pieces(httpx.AsyncByteStream):
    """An upstream body that arrives in these pieces (respx pre-reads plain ``content=``)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for item in self.pieces:
            yield item


def ndjson_stream(*lines: dict[str, Any]) -> Pieces:
    """One piece per line, as Ollama flushes them."""
    return Pieces(*(ndjson(line) for line in lines))


def piece(text: str) -> dict[str, Any]:
    return {"model": "llama3.2", "message": {"role": "assistant", "content": text}, "done": False}


def sent(route: Any) -> dict[str, Any]:
    """The JSON body the fake Ollama received last."""
    return json.loads(route.calls.last.request.content)


def sse_payloads(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking its framing."""
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), text
    return [b[len("data: "):] for b in blocks]


# ------------------------------------------------------------ chat requests
async def test_chat_translates_messages_roles_images_and_tool_history(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=done_line())
    body = {"model": "llama-test", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "text", "text": "And the weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
    ]}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    got = sent(route)
    assert got["model"] == "llama3.2"
    assert got["stream"] is False
    assert got["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?\nAnd the weather?", "images": [PNG]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]


async def test_chat_maps_sampling_options_format_and_tools(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=done_line())
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    r = await http.post("/v1/chat/completions", json={
        **LLAMA, "temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": "END", "max_tokens": 64,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "tools": [WEATHER_TOOL],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert r.status_code == 200, r.text
    got = sent(route)
    assert got["options"] == {"temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["END"],
                              "num_predict": 64, "presence_penalty": 0.5, "frequency_penalty": -0.5}
    assert got["format"] == schema
    assert got["tools"] == [WEATHER_TOOL]


async def test_chat_json_object_stop_list_and_max_completion_tokens(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=done_line())
    r = await http.post("/v1/chat/completions", json={
        **LLAMA, "stop": ["a", "b"], "max_completion_tokens": 9, "max_tokens": 99,
        "response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL], "tool_choice": "none"})
    assert r.status_code == 200, r.text
    got = sent(route)
    assert got["format"] == "json"
    assert got["options"] == {"stop": ["a", "b"], "num_predict": 9}
    assert "tools" not in got  # tool_choice "none": Ollama has no such switch, so leave them out


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]},
     "messages[0].content[0].image_url"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]},
     "messages[0].content[0].type"),
])
async def test_untranslatable_messages_are_400_naming_the_field(client, message, param):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=done_line())
    r = await http.post("/v1/chat/completions", json={"model": "llama-test", "messages": [message]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert not route.called


async def test_http_image_url_error_says_the_gateway_does_not_fetch(client):
    http, _ = client
    r = await http.post("/v1/chat/completions", json={"model": "llama-test", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x.test/a.png"}}]}]})
    assert r.status_code == 400
    assert "does not fetch" in r.json()["error"]["message"]


async def test_n_above_one_is_400(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, json=done_line())
    r = await http.post("/v1/chat/completions", json={**LLAMA, "n": 2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"
    assert not route.called


# ------------------------------------------------------------ chat answers
async def test_chat_answer_in_openai_shape_with_usage(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, json=done_line(
        message={"role": "assistant", "content": "Hi there!"}, prompt_eval_count=12, eval_count=4))
    r = await http.post("/v1/chat/completions", json=LLAMA)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "llama3.2"
    assert data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int) and data["created"] > 1_700_000_000
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Hi there!"
    assert choice["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}


async def test_chat_answer_cut_by_length(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, json=done_line(
        message={"role": "assistant", "content": "Once upon"}, done_reason="length"))
    r = await http.post("/v1/chat/completions", json={**LLAMA, "max_tokens": 2})
    assert r.json()["choices"][0]["finish_reason"] == "length"


async def test_chat_answer_with_tool_calls(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, json=done_line(message={
        "role": "assistant", "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                       {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}))
    r = await http.post("/v1/chat/completions", json={**LLAMA, "tools": [WEATHER_TOOL]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert all(c["type"] == "function" and c["function"]["name"] == "get_weather" for c in calls)
    assert all(re.fullmatch(r"call_[0-9a-f]+", c["id"]) for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize(("status", "expected", "etype"), [
    (404, 404, "invalid_request_error"),
    (400, 400, "invalid_request_error"),
    (500, 502, "upstream_error"),
])
async def test_upstream_errors_mapped_to_openai_shape(client, status, expected, etype):
    http, upstream = client
    upstream.post(CHAT_URL).respond(status, json={"error": "model 'llama3.2' not found"})
    r = await http.post("/v1/chat/completions", json=LLAMA)
    assert r.status_code == expected
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == etype
    assert "model 'llama3.2' not found" in error["message"]


async def test_stream_request_failing_before_first_line_is_an_http_error(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(404, json={"error": "model 'llama3.2' not found"})
    r = await http.post("/v1/chat/completions", json={**LLAMA, "stream": True})
    assert r.status_code == 404
    assert "not found" in r.json()["error"]["message"]


async def test_unreachable_ollama_is_502(client):
    http, upstream = client
    upstream.post(CHAT_URL).mock(side_effect=httpx.ConnectError("refused"))
    r = await http.post("/v1/chat/completions", json=LLAMA)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_connect_error"


# ------------------------------------------------------------ chat streams
async def test_stream_relays_content_and_ends_with_done(client):
    http, upstream = client
    route = upstream.post(CHAT_URL).respond(200, stream=ndjson_stream(
        piece("Hel"), piece("lo"), piece(" world"), done_line()))
    r = await http.post("/v1/chat/completions", json={**LLAMA, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert sent(route)["stream"] is True
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "llama3.2" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "Hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)  # not asked for


async def test_stream_usage_chunk_only_when_asked(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, stream=ndjson_stream(
        piece("Hi"), done_line(prompt_eval_count=8, eval_count=1, done_reason="length")))
    r = await http.post("/v1/chat/completions", json={
        **LLAMA, "stream": True, "stream_options": {"include_usage": True}})
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    usage_chunk, finish_chunk = json.loads(payloads[-2]), json.loads(payloads[-3])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}
    assert finish_chunk["choices"][0]["finish_reason"] == "length"


async def test_streamed_tool_calls_have_stable_indexes_and_whole_arguments(client):
    http, upstream = client
    first = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    second = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    upstream.post(CHAT_URL).respond(200, stream=ndjson_stream(
        {"model": "llama3.2", "message": {"role": "assistant", "content": "", "tool_calls": [first]},
         "done": False},
        {"model": "llama3.2", "message": {"role": "assistant", "content": "", "tool_calls": [second]},
         "done": False},
        done_line()))
    r = await http.post("/v1/chat/completions", json={**LLAMA, "stream": True, "tools": [WEATHER_TOOL]})
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [tc["index"] for tc in calls] == [0, 1]
    assert [json.loads(tc["function"]["arguments"]) for tc in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert all(tc["id"].startswith("call_") and tc["type"] == "function" for tc in calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_error_line_mid_stream_ends_with_an_error_event(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, stream=ndjson_stream(
        piece("Hel"), {"error": "an error was encountered while running the model: CUDA OOM"}))
    r = await http.post("/v1/chat/completions", json={**LLAMA, "stream": True})
    assert r.status_code == 200  # the stream had started
    payloads = sse_payloads(r.text)
    assert json.loads(payloads[0])["choices"][0]["delta"]["content"] == "Hel"
    assert "[DONE]" not in payloads
    error = json.loads(payloads[-1])["error"]
    assert error["type"] == "upstream_error"
    assert "CUDA OOM" in error["message"]


async def test_stream_cut_before_its_last_line_ends_with_an_error_event(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, stream=ndjson_stream(piece("Hel")))
    r = await http.post("/v1/chat/completions", json={**LLAMA, "stream": True})
    payloads = sse_payloads(r.text)
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["error"]["code"] == "upstream_bad_response"



def direct(body: GatedStream) -> tuple[OllamaProvider, Call, Deployment]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(
        lambda request: httpx.Response(200, stream=body)))
    provider = OllamaProvider(ProviderConfig(name="ollama", plugin="ollama", api_base=OLLAMA_BASE), http)
    deployment = Deployment(name="llama-test", provider=provider, model="llama3.2",
                            timeout=httpx.Timeout(5.0), options={},
                            config=ModelConfig(name="llama-test", provider="ollama"))
    call = Call(request_id="r1", operation="chat", body={**LLAMA, "stream": True}, model="llama-test",
                stream=True, headers=Headers(), upstream_model="llama3.2")
    return provider, call, deployment


async def test_stream_yields_each_line_as_it_arrives_and_sets_usage():
    body = GatedStream(ndjson(piece("Hi")), ndjson(done_line(prompt_eval_count=3, eval_count=1)))
    provider, call, deployment = direct(body)
    events = provider.chat_stream(call, deployment)
    first = await asyncio.wait_for(anext(events), 2)  # the rest of the upstream is still held back
    assert json.loads(first[len(b"data: "):])["choices"][0]["delta"]["content"] == "Hi"
    assert call.usage is None
    body.gate.set()
    rest = [event async for event in events]
    assert json.loads(rest[-1][len(b"data: "):])["choices"][0]["finish_reason"] == "stop"
    assert call.usage is not None and (call.usage.prompt_tokens, call.usage.completion_tokens) == (3, 1)
    await provider.http.aclose()


async def test_closing_a_stream_early_closes_the_upstream_response():
    body = GatedStream(ndjson(piece("Hi")), ndjson(done_line()))
    provider, call, deployment = direct(body)
    events = provider.chat_stream(call, deployment)
    await anext(events)
    await events.aclose()
    assert body.closed
    await provider.http.aclose()


async def test_mid_stream_error_line_raises_502():
    body = GatedStream(ndjson(piece("Hi")), ndjson({"error": "boom"}))
    provider, call, deployment = direct(body)
    events = provider.chat_stream(call, deployment)
    await anext(events)
    body.gate.set()
    with pytest.raises(ProxyError) as caught:
        await anext(events)
    assert caught.value.status == 502
    assert body.closed
    await provider.http.aclose()


# ------------------------------------------------------------ generate
async def test_completion_goes_to_generate(client):
    http, upstream = client
    route = upstream.post(GENERATE_URL).respond(200, json={
        "model": "llama3.2", "response": "def add(a, b):", "done": True, "done_reason": "stop",
        "prompt_eval_count": 6, "eval_count": 7})
    r = await http.post("/v1/completions", json={
        "model": "llama-test", "prompt": ["# add two numbers\n"], "suffix": "\n    return c",
        "temperature": 0, "max_tokens": 20, "stop": ["\n\n"]})
    assert r.status_code == 200, r.text
    got = sent(route)
    assert got["prompt"] == "# add two numbers\n"
    assert got["suffix"] == "\n    return c"
    assert got["stream"] is False
    assert got["options"] == {"temperature": 0, "num_predict": 20, "stop": ["\n\n"]}
    data = r.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "def add(a, b):"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}


async def test_completion_stream(client):
    http, upstream = client
    upstream.post(GENERATE_URL).respond(200, stream=ndjson_stream(
        {"model": "llama3.2", "response": "Once", "done": False},
        {"model": "llama3.2", "response": " upon", "done": False},
        {"model": "llama3.2", "response": "", "done": True, "done_reason": "length",
         "prompt_eval_count": 2, "eval_count": 2}))
    r = await http.post("/v1/completions", json={
        "model": "llama-test", "prompt": "Tell", "stream": True, "stream_options": {"include_usage": True}})
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Once upon"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4


@pytest.mark.parametrize("prompt", [[1, 2, 3], ["one", "two"]])
async def test_token_or_batched_prompts_are_400(client, prompt):
    http, upstream = client
    route = upstream.post(GENERATE_URL).respond(200, json={"response": "", "done": True})
    r = await http.post("/v1/completions", json={"model": "llama-test", "prompt": prompt})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
    assert not route.called


# ------------------------------------------------------------ embeddings
EMBEDDINGS = {"model": "llama3.2", "embeddings": [[0.5, -0.25, 1.0], [0.125, 0.0, -1.5]],
              "prompt_eval_count": 9}


async def test_embedding_floats(client):
    http, upstream = client
    route = upstream.post(EMBED_URL).respond(200, json=EMBEDDINGS)
    r = await http.post("/v1/embeddings", json={
        "model": "llama-test", "input": ["a", "b"], "dimensions": 3, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    assert sent(route) == {"model": "llama3.2", "input": ["a", "b"], "dimensions": 3}
    data = r.json()
    assert data["object"] == "list"
    assert [d["embedding"] for d in data["data"]] == EMBEDDINGS["embeddings"]
    assert [d["index"] for d in data["data"]] == [0, 1]
    assert data["usage"] == {"prompt_tokens": 9, "total_tokens": 9}


async def test_embedding_base64_as_the_openai_sdk_asks(client):
    http, upstream = client
    upstream.post(EMBED_URL).respond(200, json=EMBEDDINGS)
    r = await http.post("/v1/embeddings", json={
        "model": "llama-test", "input": ["a", "b"], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    packed = [d["embedding"] for d in r.json()["data"]]
    assert all(isinstance(p, str) for p in packed)
    assert [unpack_floats(p) for p in packed] == EMBEDDINGS["embeddings"]  # exact in float32


async def test_embedding_token_ids_are_400(client):
    http, upstream = client
    route = upstream.post(EMBED_URL).respond(200, json=EMBEDDINGS)
    r = await http.post("/v1/embeddings", json={"model": "llama-test", "input": [[1, 2], [3]]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "input"
    assert not route.called


# ------------------------------------------------------------ wildcard models
async def test_wildcard_lists_and_routes_ollama_models(gateway):
    config = make_config(models=[{"name": "ollama/*", "provider": "ollama", "model": "*"}])
    async with gateway(config) as (http, upstream):
        upstream.get(f"{OLLAMA_BASE}/api/tags").respond(200, json={"models": [
            {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 1},
            {"name": "qwen3:8b", "model": "qwen3:8b", "size": 2}]})
        route = upstream.post(CHAT_URL).respond(200, json=done_line())
        r = await http.get("/v1/models")
        assert r.status_code == 200, r.text
        listed = {m["id"]: m["owned_by"] for m in r.json()["data"]}
        assert listed == {"ollama/llama3.2:latest": "ollama", "ollama/qwen3:8b": "ollama"}
        r = await http.post("/v1/chat/completions", json={**LLAMA, "model": "ollama/qwen3:8b"})
        assert r.status_code == 200, r.text
        assert sent(route)["model"] == "qwen3:8b"
