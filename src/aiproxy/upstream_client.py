"""The shared upstream client: an ``httpx.AsyncClient`` with a short path for what providers do.

Providers build a request (an absolute URL, headers, bytes, a timeout) and send it.
For that, ``httpx.AsyncClient`` parses the URL again on every call, merges cookie
jars and query params nobody set, walks the auth and redirect machinery and extracts
cookies from every answer: about a third of the gateway's CPU per call before this
client (see ``bench/RESULTS.md``). Here those calls take a direct path, and anything
else (``params``, ``json=``, cookies, an auth, event hooks, redirects) goes through
httpx unchanged, so the client is still an ``httpx.AsyncClient`` in every way a
provider or a test can tell.
"""

from __future__ import annotations

from typing import Any

import httpx
from httpx._client import USE_CLIENT_DEFAULT, UseClientDefault
from httpx._types import (
    AuthTypes,
    CookieTypes,
    HeaderTypes,
    QueryParamTypes,
    RequestContent,
    RequestData,
    RequestExtensions,
    RequestFiles,
    TimeoutTypes,
)

from aiproxy import httpx_lean
from aiproxy.transport import Body

_URL_CACHE_SIZE = 1024


class UpstreamClient(httpx.AsyncClient):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._urls: dict[str, tuple[httpx.URL, bytes]] = {}  # url -> (parsed, its netloc)
        # id(timeout) -> (that timeout, its as_dict()): a deployment's httpx.Timeout is built
        # once, so a request need not copy it; the entry holds the object, so its id stays its own
        self._timeouts: dict[int, tuple[TimeoutTypes, dict[str, float | None]]] = {}
        self._default_headers = {k.lower(): v for k, v in self.headers.items()}

    def build_request(self, method: str, url: httpx.URL | str, *, content: RequestContent | None = None,
                      data: RequestData | None = None, files: RequestFiles | None = None,
                      json: Any | None = None, params: QueryParamTypes | None = None,
                      headers: HeaderTypes | None = None, cookies: CookieTypes | None = None,
                      timeout: TimeoutTypes | UseClientDefault = USE_CLIENT_DEFAULT,
                      extensions: RequestExtensions | None = None) -> httpx.Request:
        if params or not isinstance(url, str) or not isinstance(headers, dict | None) \
                or data is not None or files is not None or json is not None or cookies is not None \
                or extensions is not None or self.base_url.raw_host or self._has_cookies():
            return super().build_request(method, url, content=content, data=data, files=files, json=json,
                                         params=params, headers=headers, cookies=cookies, timeout=timeout,
                                         extensions=extensions)
        cached_url = self._urls.get(url)
        if cached_url is None:
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            parsed = httpx.URL(url)
            cached_url = self._urls[url] = (parsed, parsed.netloc)
        parsed, netloc = cached_url
        limits: TimeoutTypes = self.timeout if isinstance(timeout, UseClientDefault) else timeout
        cached = self._timeouts.get(id(limits))
        if cached is None or cached[0] is not limits:
            if len(self._timeouts) >= _URL_CACHE_SIZE:
                self._timeouts.clear()
            cached = self._timeouts[id(limits)] = (limits, httpx.Timeout(limits).as_dict())
        merged = {**self._default_headers, **headers} if headers else self._default_headers
        # a new extensions dict per request (a provider adds to it); the timeouts in it are only read
        extensions = {"timeout": cached[1]}
        if httpx_lean.LEAN and method.isupper() and isinstance(content, bytes | None):
            lean = httpx_lean.request(method, parsed, netloc, content, merged, extensions)
            if lean is not None:
                return lean
        return httpx.Request(method, parsed, content=content, headers=merged, extensions=extensions)

    def _has_cookies(self) -> bool:
        # ``bool(self.cookies)`` walks the whole jar on every call; its dict is enough
        jar: Any = self._cookies.jar
        return bool(getattr(jar, "_cookies", True))

    async def send(self, request: httpx.Request, *, stream: bool = False,
                   auth: AuthTypes | UseClientDefault | None = USE_CLIENT_DEFAULT,
                   follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT) -> httpx.Response:
        hooks = self.event_hooks
        if auth is not USE_CLIENT_DEFAULT or follow_redirects is not USE_CLIENT_DEFAULT \
                or self.auth is not None or self.follow_redirects or hooks["request"] or hooks["response"]:
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        response = await self._transport_for_url(request.url).handle_async_request(request)
        response.request = request
        if stream:
            return response
        body = response.stream
        if isinstance(body, Body) and "content-encoding" not in response.headers:
            # read straight off the connection: no decoder and chunker chain for a plain body
            content = await body.read()  # a failure mid-body closes the connection itself
            # what ``aread`` and ``aclose`` leave, without the decoder and chunker chain
            response._content = content
            response.is_stream_consumed = response.is_closed = True
            response._num_bytes_downloaded = len(content)
            return response
        try:
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response
