"""aiproxy.httpx_lean: the requests and responses it builds are the ones httpx's
constructors build, attribute for attribute, so no consumer can tell them apart."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import respx

from aiproxy import httpx_lean
from aiproxy.upstream_client import UpstreamClient

URL = "http://127.0.0.1:8080/v1/chat/completions"

CASES: list[tuple[str, bytes | None, dict[str, str]]] = [
    ("POST", b'{"model":"m"}', {"content-type": "application/json", "Authorization": "Bearer k"}),
    ("POST", b"", {"content-type": "application/json"}),
    ("POST", None, {}),
    ("PUT", None, {"X-Mixed-Case": "v"}),
    ("PATCH", b"abc", {"Transfer-Encoding": "chunked"}),
    ("GET", None, {"accept": "application/json"}),
    ("POST", b"abc", {"Host": "upstream.example", "CONTENT-LENGTH": "3"}),
    ("DELETE", b"xy", {"x-a": "1", "x-b": "2"}),
]


def plain(message: httpx.Request | httpx.Response) -> dict[str, Any]:
    """Everything a consumer can read of a message, as plain values."""
    out: dict[str, Any] = {}
    for name, value in vars(message).items():
        if isinstance(value, httpx.Headers):
            out[name] = (value._list, value.encoding, value.multi_items())
        elif name == "stream":
            out[name] = (type(value), getattr(value, "_stream", value))
        else:
            out[name] = value
    return out


def test_the_lean_builders_are_in_use_with_this_httpx() -> None:
    assert httpx_lean.LEAN  # else every test below would pass by falling back


@pytest.mark.parametrize(("method", "content", "fields"), CASES)
def test_a_lean_request_is_what_httpx_builds(method: str, content: bytes | None,
                                             fields: dict[str, str]) -> None:
    url = httpx.URL(URL)
    extensions = {"timeout": {"connect": 1.0, "read": 2.0, "write": 3.0, "pool": 4.0}}
    lean = httpx_lean.request(method, url, url.netloc, content, dict(fields), dict(extensions))
    built = httpx.Request(method, url, content=content, headers=fields, extensions=dict(extensions))
    assert lean is not None
    assert plain(lean) == plain(built)
    assert lean.content == built.content and lean.url == built.url


def test_a_header_httpx_would_refuse_is_left_to_httpx() -> None:
    url = httpx.URL(URL)
    assert httpx_lean.request("POST", url, url.netloc, b"x", {"x-name": "caf\u00e9"}, {}) is None
    http = UpstreamClient()
    with pytest.raises(UnicodeEncodeError):  # httpx's own answer, as without the lean path
        http.build_request("POST", URL, content=b"x", headers={"x-name": "caf\u00e9"})


def test_a_lean_response_is_what_httpx_builds() -> None:
    stream = httpx.ByteStream(b"")
    raw = [(b"Content-Type", b"application/json"), (b"X-Request-Id", b"r1"), (b"x-dup", b"1"),
           (b"x-dup", b"2")]
    lean = httpx_lean.response(201, raw, stream, {"http_version": b"HTTP/1.1"})
    built = httpx.Response(201, headers=raw, stream=stream, extensions={"http_version": b"HTTP/1.1"})
    assert plain(lean) == plain(built)
    assert lean.headers.get_list("x-dup") == ["1", "2"] and lean.headers["content-type"] == "application/json"


@pytest.mark.parametrize("lean", [True, False])
def test_the_upstream_client_sends_the_same_request_either_way(monkeypatch: pytest.MonkeyPatch,
                                                               lean: bool) -> None:
    monkeypatch.setattr(httpx_lean, "LEAN", lean)
    http = UpstreamClient(headers={"user-agent": "aiproxy-test"}, timeout=7.0)
    request = http.build_request("POST", URL, content=b'{"a":1}',
                                 headers={"Authorization": "Bearer k", "content-type": "application/json"})
    reference = httpx.Request("POST", URL, content=b'{"a":1}', headers={
        **{k.lower(): v for k, v in http.headers.items()}, "Authorization": "Bearer k",
        "content-type": "application/json"})
    assert request.headers.multi_items() == reference.headers.multi_items()
    assert request.content == b'{"a":1}' and request.url == reference.url
    assert request.extensions["timeout"] == httpx.Timeout(7.0).as_dict()


@respx.mock
async def test_a_mocked_upstream_sees_the_lean_request() -> None:
    route = respx.post(URL).respond(200, json={"ok": True})
    async with UpstreamClient() as http:
        request = http.build_request("POST", URL, content=b'{"q":1}', headers={"x-key": "v"})
        response = await http.send(request)
    assert response.json() == {"ok": True}
    seen = route.calls.last.request
    assert seen.headers["x-key"] == "v" and seen.headers["content-length"] == "7"
    assert seen.headers["host"] == "127.0.0.1:8080" and seen.content == b'{"q":1}'
