"""Client input the gateway refuses before any provider sees it: invalid fields (400),
bodies that are not JSON objects, bodies over the size limit (413), unknown models,
routes and methods (404/405), all in the OpenAI error shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from tests.conftest import CHAT, OPENAI_BASE, make_config
from tests.helpers import error_of

BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/chat/completions", {"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/chat/completions", {"model": "gpt-test"}, "messages"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": 42}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": ["x"]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [
        {"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]}, "messages[1].tool_call_id"),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls[0]"),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": -0.1}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": True}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 1.5}, "n"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": [1]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {**CHAT, "stream_options": True}, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "user": 7}, "user"),
    ("/v1/chat/completions", {**CHAT, "tools": {"type": "function"}}, "tools"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools[0]"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": ""}}]},
     "tools[0]"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "not a schema"}}]}, "tools[0].function.parameters"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "sometimes"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": "json"}, "response_format"),
    ("/v1/completions", {"model": "gpt-test"}, "prompt"),
    ("/v1/completions", {"model": "gpt-test", "prompt": {"text": "x"}}, "prompt"),
    ("/v1/completions", {"model": "gpt-test", "prompt": "x", "best_of": 0}, "best_of"),
    ("/v1/embeddings", {"model": "embed-test"}, "input"),
    ("/v1/embeddings", {"model": "embed-test", "input": ""}, "input"),
    ("/v1/embeddings", {"model": "embed-test", "input": []}, "input"),
    ("/v1/embeddings", {"model": "embed-test", "input": [["a"]]}, "input"),
    ("/v1/embeddings", {"model": "embed-test", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ("/v1/embeddings", {"model": "embed-test", "input": "x", "dimensions": 0}, "dimensions"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
async def test_invalid_request_names_the_field(client, path, body, param):
    http, upstream = client
    r = await http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in error["message"]
    assert not upstream.calls  # nothing reached a provider


@pytest.mark.parametrize(("content", "says"), [
    (b'{"model": "gpt-test", ', "not valid JSON"),
    (b"[1, 2, 3]", "must be a JSON object, not an array"),
    (b'"text"', "must be a JSON object, not a string"),
    (b"null", "must be a JSON object"),
    (b"", "empty"),
    (b"  \n", "empty"),
])
async def test_body_that_is_not_a_json_object(client, content, says):
    http, upstream = client
    r = await http.post("/v1/chat/completions", content=content,
                        headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = error_of(r)
    assert says in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert not upstream.calls


LIMIT = 2048


@pytest.fixture
async def small_body_client(gateway):
    async with gateway(make_config(server={"max_body_bytes": LIMIT})) as pair:
        yield pair


def _padded(size: int) -> bytes:
    body = {"model": "mock-x", "messages": [{"role": "user", "content": ""}]}
    pad = size - len(orjson.dumps(body))
    body["messages"][0]["content"] = "a" * pad
    raw = orjson.dumps(body)
    assert len(raw) == size
    return raw


async def test_body_over_limit_by_content_length_is_413(small_body_client):
    http, _ = small_body_client
    r = await http.post("/v1/chat/completions", content=_padded(LIMIT + 1),
                        headers={"content-type": "application/json"})
    assert r.status_code == 413
    error = error_of(r)
    assert error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]
    r = await http.post("/v1/chat/completions", content=_padded(LIMIT),
                        headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


async def _chunked(raw: bytes, size: int = 500) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), size):
        yield raw[i:i + size]


async def test_chunked_body_over_limit_is_413(small_body_client):
    http, _ = small_body_client
    request = http.build_request("POST", "/v1/chat/completions", content=_chunked(_padded(LIMIT + 1)))
    assert "content-length" not in request.headers
    r = await http.send(request)
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"
    # Under the limit, the same chunked upload is read whole and answered.
    r = await http.post("/v1/chat/completions", content=_chunked(_padded(LIMIT)))
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


async def test_unknown_model_is_404(client):
    http, upstream = client
    r = await http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-7-ultra"})
    assert r.status_code == 404
    error = error_of(r)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-7-ultra" in error["message"]
    assert not upstream.calls


async def test_model_of_left_out_provider_is_404_naming_the_reason(gateway):
    cfg = make_config(
        providers={"openai": {"plugin": "openai", "api_base": OPENAI_BASE, "api_key": ""},
                   "mock": {"plugin": "mock"}},
        models=[{"name": "gpt-test", "provider": "openai"}, {"name": "mock-*", "provider": "mock"}])
    async with gateway(cfg) as (http, upstream):
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 404
        error = error_of(r)
        assert error["code"] == "model_not_found"
        assert "'openai'" in error["message"]
        assert "api_key is not set" in error["message"]
        assert not upstream.calls
        r = await http.get("/v1/models")
        assert [m["id"] for m in r.json()["data"]] == []  # not listed either


async def test_unknown_route_is_json_404(client):
    http, _ = client
    r = await http.post("/v1/nothing/here", json=CHAT)
    assert r.status_code == 404
    error = error_of(r)
    assert "/v1/nothing/here" in error["message"]
    r = await http.get("/")
    assert r.status_code == 404
    error_of(r)


async def test_wrong_method_is_json_405(client):
    http, _ = client
    r = await http.get("/v1/chat/completions")
    assert r.status_code == 405
    error = error_of(r)
    assert error["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


async def test_route_errors_carry_a_request_id(client):
    http, _ = client
    r = await http.get("/v2/nothing", headers={"x-request-id": "trace-7"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "trace-7"
