"""What a client sees when the upstream fails: HTTP statuses and transport errors mapped to
gateway answers, provider keys scrubbed from them, and streams that fail before or after
their first event.

All answers are in the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``
with the right status, and no provider key ever appears in one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from tests.conftest import CHAT, make_config
from tests.helpers import CHAT_URL, KEY, STREAM, Errors, assert_no_secret, error_of, with_plugins


def stream_events(text: str) -> list[str]:
    assert text.endswith("\n\n"), text
    return [e.removeprefix("data: ") for e in text[:-2].split("\n\n")]


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


async def test_provider_key_never_reaches_the_logs_even_at_debug(client, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    http, upstream = client
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error"}}
    upstream.post(CHAT_URL).respond(401, json=echo)
    await http.post("/v1/chat/completions", json=CHAT)
    upstream.post(CHAT_URL).respond(400, json=echo)
    await http.post("/v1/chat/completions", json=CHAT)
    upstream.post(CHAT_URL).mock(side_effect=httpx.ConnectError(f"refused {KEY}"))
    await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    upstream.post(CHAT_URL).respond(200, content=b"not json " + KEY.encode())
    await http.post("/v1/chat/completions", json=CHAT)
    assert caplog.records, "nothing was logged: the check would prove nothing"
    assert KEY not in caplog.text
