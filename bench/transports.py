"""The upstream clients the benchmark compares, and a launcher that serves aiproxy with one.

    python bench/transports.py NAME serve --config cfg.yaml   # `aiproxy serve` with client NAME

NAME:
- ``aiproxy``: what ``aiproxy.upstream.build_client`` ships (UpstreamClient over
  aiproxy.transport.Transport);
- ``httpx``: a plain ``httpx.AsyncClient`` with httpx's own pool (httpcore over anyio),
  limits as aiproxy had them before: the baseline;
- ``httpx-fastpath``: UpstreamClient over httpx's own pool (what the client shortcut alone buys);
- ``httpcore2``: UpstreamClient over httpcore2's pool (the pool under ``httpx2``, which the
  provider SDKs of this era use), adapted like httpx adapts httpcore;
- ``aiohttp``: UpstreamClient over an aiohttp session (needs ``pip install aiohttp``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from aiproxy.config import DEFAULT_TIMEOUTS
from aiproxy.transport import Transport
from aiproxy.upstream import to_httpx
from aiproxy.upstream_client import UpstreamClient

LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=60)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes], close: Callable[[], Any]) -> None:
        self._chunks = chunks
        self._close = close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        result = self._close()
        if hasattr(result, "__await__"):
            await result


class Httpcore2Transport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        import httpcore2
        self._core = httpcore2
        self._pool = httpcore2.AsyncConnectionPool(max_connections=1000, max_keepalive_connections=200,
                                                   keepalive_expiry=60)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = self._core
        req = core.Request(method=request.method,
                           url=core.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                                        port=request.url.port, target=request.url.raw_path),
                           headers=request.headers.raw, content=request.stream,
                           extensions=request.extensions)
        try:
            resp = await self._pool.handle_async_request(req)
        except core.ConnectError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except core.TimeoutException as exc:
            raise httpx.ReadTimeout(str(exc)) from exc
        except core.NetworkError as exc:
            raise httpx.ReadError(str(exc)) from exc
        return httpx.Response(resp.status, headers=resp.headers,
                              stream=_Stream(resp.aiter_stream(), resp.aclose), extensions=resp.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._session: Any = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=60),
                auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
        t = request.extensions.get("timeout") or {}
        timeout = aiohttp.ClientTimeout(sock_connect=t.get("connect"), sock_read=t.get("read"))
        headers = [(k.decode(), v.decode()) for k, v in request.headers.raw if k.lower() != b"host"]
        try:
            resp = await self._session.request(request.method, str(request.url), data=request.content,
                                               headers=headers, timeout=timeout, allow_redirects=False)
        except aiohttp.ClientConnectionError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        return httpx.Response(resp.status, headers=list(resp.raw_headers),
                              stream=_Stream(resp.content.iter_any(), resp.release))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def client(name: str) -> Callable[[httpx.AsyncBaseTransport | None], httpx.AsyncClient]:
    timeout = to_httpx(DEFAULT_TIMEOUTS)

    def build(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
        if name == "httpx":
            return httpx.AsyncClient(transport=transport, timeout=timeout, limits=LIMITS, trust_env=False)
        made: httpx.AsyncBaseTransport = {
            "aiproxy": lambda: Transport(max_connections=1000, max_keepalive=200, keepalive_expiry=60),
            "httpx-fastpath": lambda: httpx.AsyncHTTPTransport(limits=LIMITS, trust_env=False),
            "httpcore2": Httpcore2Transport,
            "aiohttp": AiohttpTransport,
        }[name]()
        return UpstreamClient(transport=transport or made, timeout=timeout, trust_env=False)

    return build


def main() -> int:
    name, argv = sys.argv[1], sys.argv[2:]
    import aiproxy.app
    from aiproxy.cli import main as aiproxy_main
    aiproxy.app.build_client = client(name)  # type: ignore[assignment]
    return aiproxy_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
