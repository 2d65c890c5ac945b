"""Upstream HTTP: the shared client, and upstream failures turned into ProxyError.

Every provider that speaks HTTP maps failures through here, so a 429 from Ollama and
a 429 from OpenAI reach the client the same way, and a provider key that an upstream
echoes in a message never reaches the client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import orjson

from aiproxy.config import DEFAULT_TIMEOUTS, ProviderConfig, Timeouts
from aiproxy.errors import ProxyError
from aiproxy.provider import Provider
from aiproxy.transport import Transport
from aiproxy.upstream_client import UpstreamClient

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.router import Deployment

_PASSED_ON = {400, 404, 409, 413, 415, 422}
_RATE_HEADERS = ("retry-after", "retry-after-ms")


def build_client(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The one pooled client for all upstream traffic.

    Its network is :class:`aiproxy.transport.Transport` unless ``transport`` replaces it
    (tests pass ``httpx.MockTransport``); ``bench/`` measured both against httpx's own.
    """
    return UpstreamClient(
        transport=transport or Transport(max_connections=1000, max_keepalive=200, keepalive_expiry=60),
        timeout=to_httpx(DEFAULT_TIMEOUTS),
        follow_redirects=False,
        trust_env=False,  # never route provider traffic through an ambient proxy setting
    )


def to_httpx(t: Timeouts) -> httpx.Timeout:
    d = DEFAULT_TIMEOUTS
    return httpx.Timeout(
        connect=t.connect if t.connect is not None else d.connect,
        read=t.read if t.read is not None else d.read,
        write=t.write if t.write is not None else d.write,
        pool=t.pool if t.pool is not None else d.pool,
    )


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def error_message(body: bytes) -> tuple[str | None, dict[str, Any]]:
    """The message in an upstream error body, and its error object when it has one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or None), {}
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, str):
            return err, {}
        if isinstance(err, dict):
            message = err.get("message") or data.get("message")
            return (str(message) if message else None), err
    return None, {}


def upstream_error(provider: str, status: int, body: bytes, headers: Mapping[str, str],
                   secrets: Iterable[str | None] = ()) -> ProxyError:
    """Map an upstream error response to what the client should see."""
    message, err = error_message(body)
    message = scrub(message, secrets) if message else None
    code = err.get("code") if isinstance(err.get("code"), str) else None
    etype = err.get("type") if isinstance(err.get("type"), str) else None
    if status == 429:
        passed = {k: headers[k] for k in _RATE_HEADERS if k in headers}
        return ProxyError(429, message or f"provider {provider!r} is rate limiting requests",
                          type="rate_limit_error", code=code or "rate_limit_exceeded", headers=passed)
    if status in (401, 403):
        return ProxyError(502, f"provider {provider!r} rejected the gateway's credentials "
                          f"(upstream status {status}); check its api_key",
                          type="upstream_error", code="upstream_auth_failed")
    if status in _PASSED_ON:
        return ProxyError(status, message or f"provider {provider!r} rejected the request "
                          f"(upstream status {status})",
                          type=etype or "invalid_request_error", param=_param(err), code=code)
    if status in (503, 529):
        return ProxyError(503, f"provider {provider!r} is overloaded or unavailable "
                          f"(upstream status {status})" + (f": {message}" if message else ""),
                          type="service_unavailable", code="upstream_unavailable",
                          headers={k: headers[k] for k in _RATE_HEADERS if k in headers})
    if status in (408, 504):
        return ProxyError(504, f"provider {provider!r} timed out (upstream status {status})",
                          type="timeout_error", code="upstream_timeout")
    if 400 <= status < 500:
        return ProxyError(status, message or f"provider {provider!r} answered {status}",
                          type=etype or "invalid_request_error", code=code)
    return ProxyError(502, f"provider {provider!r} failed (upstream status {status})"
                      + (f": {message}" if message else ""),
                      type="upstream_error", code="upstream_error")


def _param(err: dict[str, Any]) -> str | None:
    param = err.get("param")
    return param if isinstance(param, str) else None


def transport_error(provider: str, exc: httpx.HTTPError) -> ProxyError:
    """Map a connection-level failure (no HTTP answer) to 502/503/504."""
    if isinstance(exc, httpx.PoolTimeout):
        return ProxyError(503, f"gateway connection pool to provider {provider!r} is exhausted",
                          type="service_unavailable", code="pool_timeout")
    if isinstance(exc, httpx.ConnectTimeout):
        return ProxyError(504, f"timed out connecting to provider {provider!r}",
                          type="timeout_error", code="upstream_connect_timeout")
    if isinstance(exc, httpx.TimeoutException):
        return ProxyError(504, f"provider {provider!r} timed out", type="timeout_error",
                          code="upstream_timeout")
    if isinstance(exc, httpx.ConnectError):
        return ProxyError(502, f"could not connect to provider {provider!r}", type="upstream_error",
                          code="upstream_connect_error")
    return ProxyError(502, f"connection to provider {provider!r} failed: {type(exc).__name__}",
                      type="upstream_error", code="upstream_connection_error")


def invalid_response(provider: str, detail: str = "invalid JSON") -> ProxyError:
    return ProxyError(502, f"provider {provider!r} sent a malformed response ({detail})",
                      type="upstream_error", code="upstream_bad_response")


def parse_json(provider: str, body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid_response(provider) from None
    if not isinstance(data, dict):
        raise invalid_response(provider, "expected a JSON object")
    return data


class HTTPProvider(Provider):
    """A provider whose upstream speaks HTTP: base URL, headers, sending, error mapping.

    Header names are lower-cased, so config ``headers:`` override the provider's own
    (auth included) and a stage's ``call.upstream_headers`` override both, whatever
    case each was written in.
    """

    default_base: ClassVar[str] = ""

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        self.base = (config.api_base or self.default_base).rstrip("/")
        self.headers = {"content-type": "application/json", **self.auth_headers(),
                        **{k.lower(): v for k, v in config.headers.items()}}
        self.params: dict[str, str] | None = None
        self._credential_headers: dict[str, dict[str, str]] = {}

    def auth_headers(self) -> dict[str, str]:
        """Headers that carry ``config.api_key``; none by default."""
        return {}

    def credential_headers(self, api_key: str) -> dict[str, str]:
        """:meth:`auth_headers` as they would be with ``api_key`` as ``config.api_key``
        (a tenant's own key, set per call in ``call.credentials``)."""
        headers = self._credential_headers.get(api_key)
        if headers is None:
            own = self.config
            self.config = dataclasses.replace(own, api_key=api_key)
            try:
                headers = self.auth_headers()
            finally:
                self.config = own
            if len(self._credential_headers) >= 1024:
                self._credential_headers.clear()
            self._credential_headers[api_key] = headers
        return headers

    def secrets(self, request: httpx.Request | None = None) -> tuple[str | None, ...]:
        """Values never to pass on to a client, even when an upstream echoes them: the
        provider's key, and the tenant's key ``request`` was sent with, if any."""
        if request is not None and "aiproxy.credential" in request.extensions:
            return (self.config.api_key, request.extensions["aiproxy.credential"])
        return (self.config.api_key,)

    def build(self, call: Call, deployment: Deployment, path: str, body: Any) -> httpx.Request:
        """A POST of ``body`` (a dict, or JSON bytes) to ``path`` under the base URL."""
        headers = self.headers
        credential = call.credentials.get(self.name) if call.credentials else None
        if credential:
            headers = {**headers, **self.credential_headers(credential)}
        elif not self.config.api_key and self.config.options.get("tenant_keys_only") is True:
            raise ProxyError(403, f"provider {self.name!r} is used with each tenant's own key, and "
                             "none is stored for this caller's tenant", code="provider_key_required")
        if call.upstream_headers:
            headers = {**headers, **{k.lower(): v for k, v in call.upstream_headers.items()}}
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        request = self.http.build_request("POST", self.base + path, content=content, headers=headers,
                                          params=self.params, timeout=deployment.timeout)
        if credential:
            request.extensions["aiproxy.credential"] = credential  # for secrets(): scrub it too
        return request

    def build_get(self, path: str, timeout: float = 10.0) -> httpx.Request:
        return self.http.build_request("GET", self.base + path, headers=self.headers,
                                       params=self.params, timeout=timeout)

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send; an error status or a failed connection becomes the matching ProxyError."""
        try:
            response = await self.http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from None
        if response.status_code >= 400:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise self.error_for(response.status_code, body, response.headers, self.secrets(request))
        return response

    def error_for(self, status: int, body: bytes, headers: httpx.Headers,
                  secrets: Iterable[str | None]) -> ProxyError:
        """The ProxyError for an upstream error answer; override to read a provider's own
        error details. ``secrets`` (every key the request carried) must not appear in it."""
        return upstream_error(self.name, status, body, headers, secrets)

    @asynccontextmanager
    async def streaming(self, request: httpx.Request) -> AsyncIterator[httpx.Response]:
        """Send for a streamed answer; a connection failure while reading it becomes a
        ProxyError, and the response is closed however the reading ends (a client that
        went away included: closing an unfinished response cancels it upstream). A
        tenant's own key echoed in a mid-stream error is scrubbed like the provider's."""
        response = await self.send(request, stream=True)
        try:
            yield response
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from None
        except ProxyError as exc:  # a mid-stream error: no key of this request may be in it
            if "aiproxy.credential" in request.extensions:
                exc.message = scrub(exc.message, self.secrets(request))
            raise
        finally:
            await response.aclose()

    def stream_error(self, message: str | None) -> ProxyError:
        """An error the upstream reported in the middle of a stream."""
        return ProxyError(502, f"provider {self.name!r} failed mid-stream: "
                          f"{scrub(message or 'no message', self.secrets())}",
                          type="upstream_error", code="upstream_error")

    async def post_json(self, call: Call, deployment: Deployment, path: str,
                        body: Any) -> tuple[dict[str, Any], bytes]:
        """POST and parse a whole JSON answer: (object, the exact bytes)."""
        response = await self.send(self.build(call, deployment, path, body))
        raw = response.content
        return parse_json(self.name, raw), raw
