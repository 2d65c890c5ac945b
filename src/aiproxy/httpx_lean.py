"""httpx's Request and Response, built without their constructors' general machinery.

``httpx.Request(...)`` normalises every header again, re-parses or copies the URL, runs
the content encoder and rebuilds the header list to add Host and Content-Length; the
upstream client knows all of that already (a parsed URL, string headers, bytes). Here
the same objects are made by filling in exactly the attributes httpx's constructors
set, so every consumer (the transport, respx, a test's MockTransport) sees an ordinary
``httpx.Request`` / ``httpx.Response``.

At import the lean builders are checked against httpx's own constructors on sample
input; if an httpx release sets anything differently, :data:`LEAN` is False and the
callers use the constructors, as before.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from httpx._content import ByteStream

log = logging.getLogger("aiproxy.upstream")

_BODY_METHODS = ("POST", "PUT", "PATCH")


def headers(raw: list[tuple[bytes, bytes, bytes]]) -> httpx.Headers:
    """Headers from (name, lower-cased name, value) triples, all bytes, as httpx keeps them."""
    out = object.__new__(httpx.Headers)
    out._list = raw
    out._encoding = None
    return out


def request(method: str, url: httpx.URL, netloc: bytes, content: bytes | None,
            fields: dict[str, str], extensions: dict[str, Any]) -> httpx.Request | None:
    """What ``httpx.Request(method, url, content=content, headers=fields, extensions=...)``
    builds, for an upper-case ``method`` and ASCII string headers; None when the headers are
    not all ASCII strings (the caller then asks httpx, which says what is wrong)."""
    raw: list[tuple[bytes, bytes, bytes]] = []
    has_host = has_length = has_chunked = False
    try:
        for name, value in fields.items():
            key = name.encode("ascii")
            lower = key.lower()
            raw.append((key, lower, value.encode("ascii")))
            if lower == b"host":
                has_host = True
            elif lower == b"content-length":
                has_length = True
            elif lower == b"transfer-encoding":
                has_chunked = True
    except (AttributeError, UnicodeEncodeError):
        return None
    auto = [] if has_host else [(b"Host", b"host", netloc)]
    if not content:  # none or empty: httpx sends Content-Length 0 only for a method with a body
        body = b""
        if method in _BODY_METHODS and not (has_length or has_chunked):
            auto.append((b"Content-Length", b"content-length", b"0"))
    else:
        body = content
        if not has_length:
            raw.append((b"Content-Length", b"content-length", str(len(content)).encode()))
    if auto:
        raw[:0] = auto
    out = object.__new__(httpx.Request)
    out.method = method
    out.url = url
    out.headers = headers(raw)
    out.extensions = extensions
    out.stream = ByteStream(body)
    out._content = body
    return out


def response(status: int, raw: list[tuple[bytes, bytes]], stream: httpx.AsyncByteStream,
             extensions: dict[str, Any]) -> httpx.Response:
    """What ``httpx.Response(status, headers=raw, stream=stream, extensions=...)`` builds,
    for headers as bytes pairs (as read off the wire)."""
    out = object.__new__(httpx.Response)
    out.status_code = status
    out.headers = headers([(name, name.lower(), value) for name, value in raw])
    out._request = None
    out.next_request = None
    out.extensions = extensions
    out.history = []
    out.is_closed = False
    out.is_stream_consumed = False
    out.default_encoding = "utf-8"
    out.stream = stream
    out._num_bytes_downloaded = 0
    return out


def _same(lean: Any, built: Any) -> bool:
    a, b = vars(lean), vars(built)
    if a.keys() != b.keys():
        return False
    for name, value in a.items():
        other = b[name]
        if isinstance(value, httpx.Headers):
            if value.raw != other.raw or value._list != other._list:
                return False
        elif isinstance(value, ByteStream):
            if type(other) is not ByteStream or value._stream != other._stream:
                return False
        elif name != "stream" and value != other:
            return False
    return True


def _check() -> bool:
    url = httpx.URL("http://127.0.0.1:8080/v1/chat")
    ext = {"timeout": {"connect": 1.0, "read": 2.0, "write": 3.0, "pool": 4.0}}
    cases: list[tuple[str, bytes | None, dict[str, str]]] = [
        ("POST", b'{"a":1}', {"content-type": "application/json", "Authorization": "Bearer x"}),
        ("POST", None, {"accept": "*/*"}),
        ("GET", None, {"Host": "example", "x-a": "b"}),
        ("POST", b"xy", {"content-length": "2", "x-b": "c"}),
        ("POST", b"", {"transfer-encoding": "chunked"}),
        ("PUT", None, {"transfer-encoding": "chunked"}),
        ("POST", b"", {"x-c": "d"}),
    ]
    try:
        for method, content, fields in cases:
            lean = request(method, url, url.netloc, content, dict(fields), dict(ext))
            built = httpx.Request(method, url, content=content, headers=fields, extensions=dict(ext))
            if lean is None or not _same(lean, built):
                return False
        stream = ByteStream(b"")
        raw = [(b"Content-Type", b"text/plain"), (b"x-y", b"z")]
        lean_response = response(200, raw, stream, {"http_version": b"HTTP/1.1"})
        built_response = httpx.Response(200, headers=raw, stream=stream,
                                        extensions={"http_version": b"HTTP/1.1"})
        return _same(lean_response, built_response)
    except Exception:
        return False


#: the lean builders make what httpx's constructors make, with the httpx installed here
LEAN = _check()
if not LEAN:
    log.warning("httpx %s builds requests differently from what aiproxy expects: using its "
                "constructors (correct, a little slower)", httpx.__version__)
