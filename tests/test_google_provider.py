"""The google provider: OpenAI requests as Gemini ``generateContent`` bodies, and whole answers back.

Streaming and upstream errors are in test_google_stream.py; a started server in
test_google_e2e.py. Every body sent upstream is checked against ``google.genai.types``
(:func:`tests.google_support.sent`), every fixture too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest
from starlette.datastructures import Headers

from aiproxy.builtin.google import GoogleProvider
from aiproxy.builtin.google_wire import SIGNATURE
from aiproxy.call import Call
from aiproxy.config import ModelConfig, load_config
from aiproxy.router import Deployment
from aiproxy.wire import unpack_floats
from tests.google_support import (
    FIXTURES,
    GEMINI,
    GENERATE,
    GOOGLE_BASE,
    GOOGLE_KEY,
    TIME,
    WEATHER,
    fixture,
    google_config,
    sent,
    sse_fixture,
)


@pytest.fixture
async def gclient(gateway):
    async with gateway(google_config()) as pair:
        yield pair


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir()))
def test_every_fixture_is_a_real_gemini_shape(name):
    """The fixtures are written from the documented wire format; the SDK's types agree."""
    if name.endswith(".sse"):
        assert sse_fixture(name)
    else:
        assert fixture(name)


# ------------------------------------------------------------ requests
async def test_roles_system_merging_and_the_key_in_a_header(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    r = await http.post("/v1/chat/completions", json={"model": "gemini-test", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Bien."},
        {"role": "assistant", "content": [{"type": "text", "text": "Et toi?"}]},
        {"role": "user", "content": "Good."}]})
    assert r.status_code == 200, r.text
    got = sent(route)
    assert got["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]}
    assert got["contents"] == [
        {"role": "user", "parts": [{"text": "Hi"}, {"text": "How are you?"}]},
        {"role": "model", "parts": [{"text": "Bien."}, {"text": "Et toi?"}]},
        {"role": "user", "parts": [{"text": "Good."}]}]
    assert "generationConfig" not in got
    request = route.calls.last.request
    assert request.headers["x-goog-api-key"] == GOOGLE_KEY
    assert GOOGLE_KEY not in str(request.url) and "key=" not in str(request.url)
    assert "authorization" not in request.headers


async def test_generation_config_from_openai_fields(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "additionalProperties": False}
    r = await http.post("/v1/chat/completions", json={
        **GEMINI, "max_tokens": 99, "max_completion_tokens": 64, "temperature": 0.2, "top_p": 0.9,
        "stop": "END", "n": 2, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert sent(route)["generationConfig"] == {
        "maxOutputTokens": 64, "temperature": 0.2, "topP": 0.9, "seed": 7, "presencePenalty": 0.5,
        "frequencyPenalty": -0.5, "candidateCount": 2, "stopSequences": ["END"],
        "responseMimeType": "application/json", "responseJsonSchema": schema,
        "thinkingConfig": {"thinkingBudget": 1024}}


async def test_json_object_stop_list_max_tokens_and_n_of_one(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    r = await http.post("/v1/chat/completions", json={
        **GEMINI, "max_tokens": 5, "stop": ["a", "b"], "n": 1, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    assert sent(route)["generationConfig"] == {"maxOutputTokens": 5, "stopSequences": ["a", "b"],
                                               "responseMimeType": "application/json"}


async def test_user_and_unknown_fields_are_dropped_with_a_debug_log(gclient, caplog):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    with caplog.at_level(logging.DEBUG, logger="aiproxy.google"):
        r = await http.post("/v1/chat/completions", json={
            **GEMINI, "user": "user-42", "parallel_tool_calls": True, "store": True, "logprobs": False})
    assert r.status_code == 200, r.text
    assert "user-42" not in route.calls.last.request.content.decode()
    dropped = " ".join(rec.getMessage() for rec in caplog.records if rec.name == "aiproxy.google")
    assert "'user'" in dropped and "'parallel_tool_calls'" in dropped and "'store'" in dropped
    assert "logprobs" not in dropped  # false asks for nothing


async def test_google_extra_body_reaches_gemini(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    safety = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    extra = {"safetySettings": safety, "generationConfig": {
        "topK": 40, "temperature": 0.1, "thinkingConfig": {"includeThoughts": True}}}
    r = await http.post("/v1/chat/completions", json={**GEMINI, "temperature": 1, "reasoning_effort": "high",
                                                      "google": extra})
    assert r.status_code == 200, r.text
    got = sent(route)
    assert got["safetySettings"] == safety
    assert got["generationConfig"] == {"temperature": 0.1, "topK": 40, "thinkingConfig": {
        "thinkingBudget": 24576, "includeThoughts": True}}


@pytest.mark.parametrize(("body", "param"), [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": {"level": "high"}}, "reasoning_effort"),  # not a string: a 400, not a 500
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": "get_weather"}},
     "tool_choice.allowed_tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"tools": 5}}},
     "tool_choice.allowed_tools"),
    ({"tools": [{"type": "custom", "function": {"name": "grep"}}]}, "tools[0].type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"google": {"contents": []}}, "google.contents"),
    ({"messages": [{"role": "system", "content": "only a system message"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c9", "content": "1"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
     "messages[0].content[0].file"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/a.png"}}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png,notbase64"}}]}]}, "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,!!not*base64"}}]}]}, "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "0", "format": "wav"}}]}]}, "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {
        "url": "https://x.test/a.png"}}]}, {"role": "user", "content": "x"}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
async def test_what_gemini_cannot_take_is_400_naming_the_field(gclient, body, param):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    r = await http.post("/v1/chat/completions", json={**GEMINI, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error"
    assert not route.called


async def test_images_inline_and_by_url(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    r = await http.post("/v1/chat/completions", json={"model": "gemini-test", "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://img.test/cat.jpeg?size=2", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://img.test/render"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=",
                                      "filename": "a.pdf"}},
        ]}]})
    assert r.status_code == 200, r.text
    assert sent(route)["contents"][0]["parts"] == [
        {"text": "Compare"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"fileUri": "https://img.test/cat.jpeg?size=2", "mimeType": "image/jpeg"}},
        {"fileData": {"fileUri": "https://img.test/render"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}}]


# ------------------------------------------------------------ tools
@pytest.mark.parametrize(("choice", "config", "declared"), [
    (None, None, ["get_weather", "get_time"]),
    ("auto", {"mode": "AUTO"}, ["get_weather", "get_time"]),
    ("none", {"mode": "NONE"}, ["get_weather", "get_time"]),
    ("required", {"mode": "ANY"}, ["get_weather", "get_time"]),
    ({"type": "function", "function": {"name": "get_time"}},
     {"mode": "ANY", "allowedFunctionNames": ["get_time"]}, ["get_weather", "get_time"]),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}, {"mode": "ANY"}, ["get_time"]),
])
async def test_tools_and_tool_choice(gclient, choice, config, declared):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    body = {**GEMINI, "tools": [WEATHER, TIME], **({"tool_choice": choice} if choice else {})}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    got = sent(route)
    declarations = got["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in declarations] == declared
    weather = next((d for d in declarations if d["name"] == "get_weather"), None)
    if weather:
        assert weather == {"name": "get_weather", "description": "Weather in a city",
                           "parametersJsonSchema": WEATHER["function"]["parameters"]}
    assert got.get("toolConfig") == ({"functionCallingConfig": config} if config else None)


async def test_tool_history_becomes_function_calls_and_responses(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    signed = f"call_2{SIGNATURE}CiQBVKhc"
    r = await http.post("/v1/chat/completions", json={"model": "gemini-test", "tools": [WEATHER, TIME],
                                                      "messages": [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": signed, "type": "function",
             "function": {"name": "get_time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": signed, "content": [{"type": "text", "text": "noon"}]},
        {"role": "user", "content": "Thanks"}]})
    assert r.status_code == 200, r.text
    assert sent(route)["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris and the time?"}]},
        {"role": "model", "parts": [
            {"text": "Let me check."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_time", "args": {}}, "thoughtSignature": "CiQBVKhc"}]},
        {"role": "user", "parts": [  # parallel results in one turn, with what the user said next
            {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
            {"functionResponse": {"name": "get_time", "response": {"result": "noon"}}},
            {"text": "Thanks"}]}]


@pytest.mark.parametrize(("content", "response"), [
    ("42", {"result": 42}), ("[1, 2]", {"result": [1, 2]}), ("sunny", {"result": "sunny"}),
    ('{"ok": true}', {"ok": True}), ("", {"result": ""})])
async def test_tool_results_are_wrapped_into_an_object(gclient, content, response):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    r = await http.post("/v1/chat/completions", json={"model": "gemini-test", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": content}]})
    assert r.status_code == 200, r.text
    assert sent(route)["contents"][-1]["parts"] == [{"functionResponse": {"name": "f", "response": response}}]


# ------------------------------------------------------------ whole answers
async def test_answer_text_usage_id_and_created(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(200, json=fixture("generate_text.json"))
    r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["id"] == "chatcmpl-mP9vaKfWAo2xz7IP0pXBqAQ"
    assert data["object"] == "chat.completion" and data["model"] == "gemini-2.5-flash"
    assert data["created"] == 1752148800  # createTime 2025-07-10T12:00:00Z
    assert data["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hello from Gemini.", "refusal": None}}]
    assert data["usage"] == {"prompt_tokens": 9, "completion_tokens": 24, "total_tokens": 33,
                             "prompt_tokens_details": {"cached_tokens": 6},
                             "completion_tokens_details": {"reasoning_tokens": 20}}


async def test_answer_with_parallel_tool_calls(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(200, json=fixture("generate_tool_calls.json"))
    r = await http.post("/v1/chat/completions", json={**GEMINI, "tools": [WEATHER]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"  # Gemini said STOP
    message = choice["message"]
    assert message["content"] == "Checking both cities."
    calls = message["tool_calls"]
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("function", "get_weather", '{"city":"Paris"}'),
        ("function", "get_weather", '{"city":"Oslo","unit":"celsius"}')]
    assert calls[0]["id"].startswith("call_") and calls[0]["id"].endswith(f"{SIGNATURE}CiQBVKhc7mSig/A=")
    assert SIGNATURE not in calls[1]["id"] and calls[0]["id"] != calls[1]["id"]
    assert r.json()["usage"]["total_tokens"] == 62


async def test_thought_signature_round_trips_through_the_tool_call_id(gclient):
    http, upstream = gclient
    route = upstream.post(GENERATE).respond(200, json=fixture("generate_tool_calls.json"))
    first = (await http.post("/v1/chat/completions", json={**GEMINI, "tools": [WEATHER]})).json()
    message = first["choices"][0]["message"]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in message["tool_calls"]]
    r = await http.post("/v1/chat/completions", json={
        **GEMINI, "tools": [WEATHER], "messages": [*GEMINI["messages"], message, *results]})
    assert r.status_code == 200, r.text
    model_turn = sent(route)["contents"][1]["parts"]
    assert model_turn[1] == {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                             "thoughtSignature": "CiQBVKhc7mSig/A="}
    assert "thoughtSignature" not in model_turn[2]


async def test_candidates_become_choices_and_finish_reasons_map(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(200, json=fixture("generate_two_candidates.json"))
    data = (await http.post("/v1/chat/completions", json={**GEMINI, "n": 2})).json()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in data["choices"]] == [
        (0, "First.", "stop"), (1, "Second, cut", "length")]


async def test_safety_stop_is_content_filter(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(200, json=fixture("generate_safety.json"))
    choice = (await http.post("/v1/chat/completions", json=GEMINI)).json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == ""


async def test_blocked_prompt_is_a_400_content_filter(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(200, json=fixture("prompt_blocked.json"))
    r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "content_filter" and "PROHIBITED_CONTENT" in error["message"]


async def test_answer_without_candidates_is_502(gclient):
    http, upstream = gclient
    upstream.post(GENERATE).respond(200, json={"usageMetadata": {"promptTokenCount": 1}})
    r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_bad_response"


async def test_wildcard_model_names_are_escaped_into_the_path(gclient):
    http, upstream = gclient
    route = upstream.post(f"{GOOGLE_BASE}/models/gemini-2.0-flash-001:generateContent").respond(
        200, json=fixture("generate_text.json"))
    assert (await http.post("/v1/chat/completions", json={**GEMINI, "model": "google/gemini-2.0-flash-001"})
            ).status_code == 200
    assert route.called
    odd = upstream.post(url__startswith=f"{GOOGLE_BASE}/models/").respond(
        200, json=fixture("generate_text.json"))
    await http.post("/v1/chat/completions", json={**GEMINI, "model": "google/../files/x"})
    assert odd.calls.last.request.url.raw_path.startswith(b"/v1beta/models/..%2Ffiles%2Fx:")


# ------------------------------------------------------------ embeddings
async def test_one_string_uses_embed_content_with_dimensions(gclient):
    http, upstream = gclient
    route = upstream.post(f"{GOOGLE_BASE}/models/gemini-embedding-001:embedContent").respond(
        200, json=fixture("embed.json"))
    r = await http.post("/v1/embeddings", json={"model": "gemini-embed", "input": "hello", "dimensions": 4})
    assert r.status_code == 200, r.text
    assert sent(route) == {"content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 4}
    data = r.json()
    assert data["object"] == "list" and data["model"] == "gemini-embedding-001"
    assert data["data"] == [{"object": "embedding", "index": 0,
                             "embedding": [0.0132, -0.0081, 0.0417, -0.0226]}]
    assert data["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


async def test_a_list_uses_batch_embed_contents_and_base64(gclient):
    http, upstream = gclient
    route = upstream.post(f"{GOOGLE_BASE}/models/gemini-embedding-001:batchEmbedContents").respond(
        200, json=fixture("batch_embed.json"))
    r = await http.post("/v1/embeddings", json={"model": "gemini-embed", "input": ["a", "b"],
                                                "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    assert sent(route) == {"requests": [
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a"}]}},
        {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]}}]}
    vectors = [unpack_floats(d["embedding"]) for d in r.json()["data"]]
    assert vectors[1] == pytest.approx([-0.0502, 0.0299, 0.0011], rel=1e-6)


async def test_more_than_a_batch_of_inputs_is_split(gclient):
    http, upstream = gclient

    def answer(request):
        n = len(json.loads(request.content)["requests"])
        return httpx.Response(200, json={"embeddings": [{"values": [float(n), float(i)]} for i in range(n)]})

    url = f"{GOOGLE_BASE}/models/gemini-embedding-001:batchEmbedContents"
    route = upstream.post(url).mock(side_effect=answer)
    texts = [f"t{i}" for i in range(130)]
    r = await http.post("/v1/embeddings", json={"model": "gemini-embed", "input": texts,
                                                "encoding_format": "float"})
    assert r.status_code == 200, r.text
    assert route.call_count == 2
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(130))
    assert data[99]["embedding"] == [100.0, 99.0] and data[100]["embedding"] == [30.0, 0.0]


async def test_one_failed_embedding_batch_cancels_the_others(gclient):
    http, upstream = gclient
    cancelled = asyncio.Event()

    async def answer(request):
        if json.loads(request.content)["requests"][0]["content"]["parts"][0]["text"] == "t0":
            return httpx.Response(400, json={"error": {"code": 400, "message": "bad batch",
                                                       "status": "INVALID_ARGUMENT"}})
        try:
            await asyncio.sleep(30)  # the second batch would run on, and be billed
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return httpx.Response(500)

    upstream.post(f"{GOOGLE_BASE}/models/gemini-embedding-001:batchEmbedContents").mock(side_effect=answer)
    texts = [f"t{i}" for i in range(130)]
    body = {"model": "gemini-embed", "input": texts}
    r = await asyncio.wait_for(http.post("/v1/embeddings", json=body), 10)
    assert r.status_code == 400 and "bad batch" in r.json()["error"]["message"]
    assert cancelled.is_set()


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2]], ["a", ""]])
async def test_token_id_inputs_are_400(gclient, value):
    http, _ = gclient
    r = await http.post("/v1/embeddings", json={"model": "gemini-embed", "input": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


async def test_a_short_embedding_answer_is_502(gclient):
    http, upstream = gclient
    upstream.post(f"{GOOGLE_BASE}/models/gemini-embedding-001:batchEmbedContents").respond(
        200, json={"embeddings": [{"values": [1.0]}]})
    r = await http.post("/v1/embeddings", json={"model": "gemini-embed", "input": ["a", "b"]})
    assert r.status_code == 502


# ------------------------------------------------------------ models, tokens, routing
async def test_wildcard_lists_upstream_models_across_pages(gclient):
    http, upstream = gclient
    route = upstream.get(f"{GOOGLE_BASE}/models").mock(side_effect=[
        httpx.Response(200, json=fixture("models_page1.json")),
        httpx.Response(200, json=fixture("models_page2.json"))])
    ids = {m["id"] for m in (await http.get("/v1/models")).json()["data"]}
    assert {"google/gemini-2.5-flash", "google/gemini-embedding-001"} <= ids
    assert "google/imagen-4.0-generate-001" not in ids  # predict only: nothing the gateway can call
    second = route.calls[1].request
    assert second.url.params["pageToken"] == "Chdtb2RlbHMvZ2VtaW5pLWVtYmVkZGluZw=="
    assert second.headers["x-goog-api-key"] == GOOGLE_KEY and "key" not in second.url.params


async def test_count_tokens_asks_gemini(gclient):
    _, upstream = gclient
    route = upstream.post(f"{GOOGLE_BASE}/models/gemini-2.5-flash:countTokens").respond(
        200, json={"totalTokens": 17})
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream.async_handler))
    provider = GoogleProvider(google_config().providers["google"], client)
    deployment = Deployment(name="gemini-test", provider=provider, model="gemini-2.5-flash",
                            timeout=httpx.Timeout(5.0), options={},
                            config=ModelConfig(name="gemini-test", provider="google"))
    call = Call(request_id="r", operation="chat", body={**GEMINI, "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "count me"}]},
        model="gemini-test", stream=False, headers=Headers(), upstream_model="gemini-2.5-flash")
    assert await provider.count_tokens(call, deployment) == 17
    assert sent(route) == {"generateContentRequest": {
        "model": "models/gemini-2.5-flash", "contents": [{"role": "user", "parts": [{"text": "count me"}]}],
        "systemInstruction": {"parts": [{"text": "S"}]}}}
    await client.aclose()


async def test_without_a_key_the_provider_is_out_of_routing(gateway):
    async with gateway(google_config(api_key="")) as (http, _):
        r = await http.post("/v1/chat/completions", json=GEMINI)
    assert r.status_code == 404
    assert "api_key" in r.json()["error"]["message"]


def test_the_shipped_config_routes_gemini_models():
    cfg = load_config(Path(__file__).parent.parent / "config.yaml", env={"GOOGLE_AI_API_KEY": "k"})
    assert cfg.providers["google"].plugin == "google" and cfg.providers["google"].api_key == "k"
    names = {m.name for m in cfg.models if m.provider == "google"}
    assert {"gemini-2.5-flash", "gemini-*", "gemini-embedding-001"} <= names
