"""Every failure a client can see: upstream errors, bad input, auth, stage errors.

All answers are in the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``
with the right status, and no provider or master key ever appears in one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from aiproxy import hookimpl
from aiproxy.call import Call, Principal
from aiproxy.config import Config
from aiproxy.errors import ProxyError
from aiproxy.plugins import build_plugin_manager
from tests.conftest import CHAT, OPENAI_BASE, make_config

CHAT_URL = f"{OPENAI_BASE}/chat/completions"
KEY = "sk-upstream-secret-123"
STREAM = {**CHAT, "stream": True}


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error answer, checking the shape on the way."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def assert_no_secret(r: httpx.Response, secret: str = KEY) -> None:
    assert secret not in r.text
    for name, value in r.headers.items():
        assert secret not in value, name


def stream_events(text: str) -> list[str]:
    assert text.endswith("\n\n"), text
    return [e.removeprefix("data: ") for e in text[:-2].split("\n\n")]


def with_plugins(cfg: Config, **objects: object) -> Any:
    pm = build_plugin_manager(cfg)
    for name, obj in objects.items():
        pm.register(obj, name=name)
    return pm


class Errors:
    """Records what the on_error hook sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[Call, ProxyError]] = []

    @hookimpl
    async def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        self.seen.append((call, error))


async def _raising_after(first: bytes, exc: Exception) -> AsyncIterator[bytes]:
    yield first
    raise exc


FIRST = (b'data: {"id":"c","object":"chat.completion.chunk","choices":'
         b'[{"index":0,"delta":{"content":"Hel"}}]}\n\n')


# ---------------------------------------------------------------- upstream HTTP errors

async def test_upstream_429_passes_retry_after(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(
        429, headers={"retry-after": "7", "retry-after-ms": "7000", "x-ratelimit-remaining": "0"},
        json={"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert r.headers["retry-after-ms"] == "7000"
    error = error_of(r)
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"] == "slow down"


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_upstream_client_errors_pass_status_and_message(client, status):
    http, upstream = client
    upstream.post(CHAT_URL).respond(status, json={"error": {
        "message": "Invalid value for 'logit_bias'", "type": "invalid_request_error",
        "param": "logit_bias", "code": "invalid_value"}})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == status
    error = error_of(r)
    assert error["message"] == "Invalid value for 'logit_bias'"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "logit_bias"
    assert error["code"] == "invalid_value"


async def test_upstream_error_with_plain_text_body(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(400, text="bad things happened")
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 400
    assert error_of(r)["message"] == "bad things happened"


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_failure_is_502_without_upstream_message(client, status):
    http, upstream = client
    upstream.post(CHAT_URL).respond(status, json={"error": {
        "message": "Incorrect API key provided: sk-upstr***-123. Org org-xyz.", "code": "invalid_api_key"}})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    error = error_of(r)
    assert error["code"] == "upstream_auth_failed"
    assert error["type"] == "upstream_error"
    assert "Incorrect API key" not in r.text
    assert "org-xyz" not in r.text
    assert "api_key" in error["message"]  # tells the operator what to check


@pytest.mark.parametrize("status", [400, 404, 409, 422, 429, 500, 502, 503, 529])
async def test_provider_key_echoed_by_upstream_never_reaches_client(client, status):
    http, upstream = client
    upstream.post(CHAT_URL).respond(
        status, headers={"retry-after": "1"},
        json={"error": {"message": f"key {KEY} (Bearer {KEY}) is not allowed here"}})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code >= 400
    error_of(r)
    assert_no_secret(r)
    r = await http.post("/v1/chat/completions", json=STREAM)
    assert r.status_code >= 400
    assert_no_secret(r)


@pytest.mark.parametrize(("status", "expected", "etype"), [
    (500, 502, "upstream_error"),
    (502, 502, "upstream_error"),
    (503, 503, "service_unavailable"),
    (529, 503, "service_unavailable"),
    (504, 504, "timeout_error"),
    (408, 504, "timeout_error"),
])
async def test_upstream_server_errors_map_to_gateway_statuses(client, status, expected, etype):
    http, upstream = client
    upstream.post(CHAT_URL).respond(status, json={"error": {"message": "oops"}})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == expected
    error = error_of(r)
    assert error["type"] == etype
    assert "'openai'" in error["message"]  # names the provider


async def test_upstream_503_passes_retry_after(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(503, headers={"retry-after": "30"}, text="overloaded")
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "30"


@pytest.mark.parametrize(("exc", "expected", "code"), [
    (httpx.ConnectError("connection refused"), 502, "upstream_connect_error"),
    (httpx.ReadTimeout("read timed out"), 504, "upstream_timeout"),
    (httpx.ConnectTimeout("connect timed out"), 504, "upstream_connect_timeout"),
    (httpx.RemoteProtocolError("peer closed"), 502, "upstream_connection_error"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_transport_failures(client, exc, expected, code, stream):
    http, upstream = client
    upstream.post(CHAT_URL).mock(side_effect=exc)
    r = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert r.status_code == expected
    error = error_of(r)
    assert error["code"] == code
    assert "Traceback" not in r.text


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"id": "x"'])
async def test_malformed_upstream_answer_is_502(client, content):
    http, upstream = client
    upstream.post(CHAT_URL).respond(200, content=content, headers={"content-type": "application/json"})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 502
    assert error_of(r)["code"] == "upstream_bad_response"


# ---------------------------------------------------------------- streams that fail

async def test_stream_failing_before_first_event_gets_http_error_status(client):
    http, upstream = client
    upstream.post(CHAT_URL).respond(429, headers={"retry-after": "3"},
                                    json={"error": {"message": "slow down"}})
    r = await http.post("/v1/chat/completions", json=STREAM)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert error_of(r)["type"] == "rate_limit_error"

    upstream.post(CHAT_URL).respond(500, text="boom")
    r = await http.post("/v1/chat/completions", json=STREAM)
    assert r.status_code == 502
    assert "[DONE]" not in r.text
    error_of(r)


async def test_stream_dying_before_first_event_gets_http_error_status(client):
    http, upstream = client
    # Headers and a comment arrive, then the connection dies: no event went out yet.
    upstream.post(CHAT_URL).mock(side_effect=lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"},
        content=_raising_after(b": processing\n\n", httpx.ReadError("connection reset"))))
    r = await http.post("/v1/chat/completions", json=STREAM)
    assert r.status_code == 502
    assert error_of(r)["code"] == "upstream_connection_error"


@pytest.mark.parametrize(("exc", "status", "etype", "code"), [
    (httpx.ReadError("connection reset"), 502, "upstream_error", "upstream_connection_error"),
    (httpx.ReadTimeout("read timed out"), 504, "timeout_error", "upstream_timeout"),
])
async def test_stream_failing_after_first_event_ends_with_error_event(gateway, exc, status, etype, code):
    cfg = make_config()
    errors = Errors()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, errors=errors)) as (http, upstream):
        upstream.post(CHAT_URL).mock(side_effect=lambda request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_raising_after(FIRST, exc)))
        r = await http.post("/v1/chat/completions", json=STREAM)
    assert r.status_code == 200
    events = stream_events(r.text)
    assert events[0] == FIRST.decode()[len("data: "):-2]
    assert "[DONE]" not in r.text
    last = orjson.loads(events[-1])
    assert set(last) == {"error"}
    assert last["error"]["type"] == etype
    assert last["error"]["code"] == code
    assert len(events) == 2
    [(call, error)] = errors.seen
    assert error.status == status
    assert call.error is error


async def test_mock_error_after_first_chunks_ends_with_error_event(client):
    http, _ = client
    r = await http.post("/v1/chat/completions", json={
        "model": "mock-x", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "mock": {"error_after": 3, "tokens": 10}})
    assert r.status_code == 200
    events = stream_events(r.text)
    assert len(events) == 4
    assert all("chat.completion.chunk" in e for e in events[:3])
    assert orjson.loads(events[3])["error"]["type"] == "upstream_error"
    assert "[DONE]" not in r.text


async def test_mock_error_after_zero_chunks_is_an_http_error(client):
    http, _ = client
    r = await http.post("/v1/chat/completions", json={
        "model": "mock-x", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "mock": {"error_after": 0}})
    assert r.status_code == 502
    error_of(r)


# ---------------------------------------------------------------- client input

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


# ---------------------------------------------------------------- stage errors

class Broken:
    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        raise RuntimeError("database password hunter2 rejected at /srv/aiproxy/stage.py")


class Limited:
    @hookimpl
    async def aiproxy_before_call(self, call: Call) -> None:
        raise ProxyError(429, "Team quota of 10 requests per minute reached.",
                         code="team_rate_limited", headers={"retry-after": "9"})


async def test_plugin_crash_is_500_without_details(gateway, caplog):
    cfg = make_config()
    errors = Errors()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, broken=Broken(), errors=errors)) \
            as (http, upstream):
        for body in (CHAT, STREAM):
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 500
            error = error_of(r)
            assert error["type"] == "internal_error"
            for leak in ("Traceback", "RuntimeError", "hunter2", "stage.py", "broken"):
                assert leak not in r.text
        assert not upstream.calls
    assert [e.status for _, e in errors.seen] == [500, 500]
    assert "hunter2" in caplog.text  # logged for the operator instead


async def test_plugin_proxy_error_reaches_client(gateway):
    cfg = make_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, limited=Limited())) as (http, upstream):
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "9"
        error = error_of(r)
        assert error["message"] == "Team quota of 10 requests per minute reached."
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "team_rate_limited"
        assert not upstream.calls


async def test_on_error_sees_upstream_error(gateway):
    cfg = make_config()
    errors = Errors()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, errors=errors)) as (http, upstream):
        upstream.post(CHAT_URL).respond(503, text="overloaded")
        r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "rid-1"})
    assert r.status_code == 503
    [(call, error)] = errors.seen
    assert error.status == 503
    assert error.code == "upstream_unavailable"
    assert call.request_id == "rid-1"
    assert call.model == "gpt-test"
    assert call.error is error
    assert call.finished is not None


# ---------------------------------------------------------------- master key

MASTER = "mk-test"


@pytest.fixture
async def keyed(gateway):
    async with gateway(make_config(server={"master_key": MASTER})) as pair:
        yield pair


def _answer(upstream: Any) -> None:
    upstream.post(CHAT_URL).respond(200, json={"id": "c", "object": "chat.completion", "choices": []})


@pytest.mark.parametrize("headers", [
    {}, {"authorization": "Bearer mk-wrong"}, {"authorization": "mk-test"},
    {"authorization": "Basic mk-test"}, {"x-api-key": "mk-tes"}, {"authorization": "Bearer "},
], ids=["none", "wrong", "no-scheme", "basic", "prefix", "empty"])
async def test_master_key_required(keyed, headers):
    http, upstream = keyed
    _answer(upstream)
    r = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 401
    error = error_of(r)
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert_no_secret(r, MASTER)
    assert not upstream.calls
    r = await http.get("/v1/models", headers=headers)
    assert r.status_code == 401
    assert_no_secret(r, MASTER)
    r = await http.get("/v1/models/gpt-test", headers=headers)
    assert r.status_code == 401


@pytest.mark.parametrize("headers", [
    {"authorization": f"Bearer {MASTER}"}, {"authorization": f"bearer  {MASTER} "},
    {"x-api-key": MASTER}, {"api-key": MASTER},
], ids=["bearer", "bearer-lowercase", "x-api-key", "api-key"])
async def test_master_key_admits(keyed, headers):
    http, upstream = keyed
    _answer(upstream)
    r = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 200, r.text
    assert_no_secret(r, MASTER)
    # The client's key is the gateway's, not the upstream's.
    assert upstream.calls.last.request.headers["authorization"] == f"Bearer {KEY}"
    r = await http.get("/v1/models", headers=headers)
    assert r.status_code == 200
    assert "gpt-test" in [m["id"] for m in r.json()["data"]]
    assert_no_secret(r, MASTER)


async def test_health_needs_no_key(keyed):
    http, _ = keyed
    r = await http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_without_master_key_calls_are_anonymous(gateway):
    seen: list[Principal | None] = []

    class Spy:
        @hookimpl
        def aiproxy_before_call(self, call: Call) -> None:
            seen.append(call.principal)

    cfg = make_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, spy=Spy())) as (http, _):
        r = await http.post("/v1/chat/completions",
                            json={"model": "mock-a", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert [p.kind if p else None for p in seen] == ["anonymous"]


# ---------------------------------------------------------------- authenticate hooks

class Decliner:
    def __init__(self) -> None:
        self.asked = 0

    @hookimpl
    async def aiproxy_authenticate(self, call: Call) -> Principal | None:
        self.asked += 1
        return None


class TeamKeys:
    def __init__(self) -> None:
        self.asked = 0

    @hookimpl
    async def aiproxy_authenticate(self, call: Call) -> Principal | None:
        self.asked += 1
        if call.headers.get("authorization") == "Bearer team-key":
            return Principal(id="key-1", team="red", allowed_models=("mock-ok",))
        return None


class TeamHeader:
    def __init__(self) -> None:
        self.principals: list[Principal | None] = []

    @hookimpl
    def aiproxy_before_call(self, call: Call) -> None:
        self.principals.append(call.principal)
        if call.principal and call.principal.team:
            call.response_headers["x-team"] = call.principal.team


async def test_async_decline_then_async_answer(gateway):
    cfg = make_config(server={"master_key": MASTER})
    decliner, team_keys, team_header = Decliner(), TeamKeys(), TeamHeader()
    pm = build_plugin_manager(cfg)
    pm.register(team_keys, name="team_keys")
    pm.register(decliner, name="decliner")  # registered last: pluggy asks it first
    pm.register(team_header, name="team_header")
    body = {"model": "mock-ok", "messages": [{"role": "user", "content": "x"}]}
    async with gateway(cfg, plugin_manager=pm) as (http, _):
        r = await http.post("/v1/chat/completions", json=body,
                            headers={"authorization": "Bearer team-key"})
        assert r.status_code == 200, r.text
        assert r.headers["x-team"] == "red"
        assert decliner.asked == 1 and team_keys.asked == 1
        [principal] = team_header.principals
        assert isinstance(principal, Principal)
        assert principal.id == "key-1"

        # The principal's model list is enforced.
        r = await http.post("/v1/chat/completions", json={**body, "model": "mock-other"},
                            headers={"authorization": "Bearer team-key"})
        assert r.status_code == 403
        assert error_of(r)["code"] == "model_not_allowed"

        # Nobody answers: 401, after every plugin had its turn.
        r = await http.post("/v1/chat/completions", json=body,
                            headers={"authorization": "Bearer someone-else"})
        assert r.status_code == 401
        assert decliner.asked == 3 and team_keys.asked == 3

        # The master key still works alongside.
        r = await http.post("/v1/chat/completions", json=body,
                            headers={"authorization": f"Bearer {MASTER}"})
        assert r.status_code == 200
        assert team_header.principals[-1] is not None
        assert team_header.principals[-1].kind == "master"


async def test_authenticate_raising_401_rejects(gateway):
    class Rejecter:
        @hookimpl
        async def aiproxy_authenticate(self, call: Call) -> Principal | None:
            raise ProxyError(401, "This key was revoked.", code="key_revoked")

    cfg = make_config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, rejecter=Rejecter())) as (http, upstream):
        r = await http.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401
        assert error_of(r)["code"] == "key_revoked"
        r = await http.get("/v1/models")
        assert r.status_code == 401
        assert not upstream.calls


async def test_authentication_comes_before_reading_the_body(gateway):
    """A caller without a key learns nothing about the API, not even what a bad body is."""
    async with gateway(make_config(server={"master_key": MASTER})) as (http, _):
        r = await http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 401
        r = await http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": []})
        assert r.status_code == 401
        r = await http.post("/v1/chat/completions", content=b"{not json",
                            headers={"authorization": f"Bearer {MASTER}"})
        assert r.status_code == 400


async def test_route_errors_carry_a_request_id(client):
    http, _ = client
    r = await http.get("/v2/nothing", headers={"x-request-id": "trace-7"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "trace-7"
