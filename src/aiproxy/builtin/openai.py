"""Any OpenAI-compatible upstream: OpenAI itself, vLLM, LM Studio, Azure OpenAI, …

The request goes out as the client sent it, with only ``model`` replaced; answers
and stream events come back byte for byte (usage is read from them, nothing is
re-encoded). Options:

- ``auth_header``: ``authorization`` (default, ``Bearer <api_key>``) or another header
  that takes the bare key, e.g. ``api-key`` for Azure;
- ``query``: query parameters for every request, e.g. ``{api-version: 2024-10-21}``;
- ``require_api_key``: false for local servers that take none (vLLM, LM Studio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from aiproxy import hookimpl, sse
from aiproxy.call import Usage
from aiproxy.config import ProviderConfig
from aiproxy.provider import Provider, Reply
from aiproxy.upstream import parse_json, transport_error, upstream_error

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.router import Deployment

DEFAULT_BASE = "https://api.openai.com/v1"


class OpenAIProvider(Provider):
    required = ("api_key",)

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        self.base = (config.api_base or DEFAULT_BASE).rstrip("/")
        opts = config.options
        headers = {"content-type": "application/json", **config.headers}
        if config.api_key:
            auth = str(opts.get("auth_header", "authorization")).lower()
            headers[auth] = f"Bearer {config.api_key}" if auth == "authorization" else config.api_key
        self.headers = headers
        query = opts.get("query")
        self.params = {str(k): str(v) for k, v in query.items()} if isinstance(query, dict) else None

    def missing(self) -> list[str]:
        if self.config.options.get("require_api_key") is False:  # vLLM, LM Studio, …
            return []
        return super().missing()

    # ------------------------------------------------------------ plumbing
    def _request(self, call: Call, deployment: Deployment, path: str) -> httpx.Request:
        body = call.body
        if body.get("model") != call.upstream_model:
            body = {**body, "model": call.upstream_model}
        headers = {**self.headers, **call.upstream_headers} if call.upstream_headers else self.headers
        return self.http.build_request(
            "POST", self.base + path, content=orjson.dumps(body), headers=headers,
            params=self.params, timeout=deployment.timeout)

    async def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
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
            raise upstream_error(self.name, response.status_code, body, response.headers,
                                 (self.config.api_key,))
        return response

    async def _whole(self, call: Call, deployment: Deployment, path: str) -> Reply:
        response = await self._send(self._request(call, deployment, path))
        raw = response.content
        return Reply(parse_json(self.name, raw), raw=raw)

    async def _events(self, call: Call, deployment: Deployment, path: str) -> AsyncIterator[bytes]:
        response = await self._send(self._request(call, deployment, path), stream=True)
        try:
            done = False  # after [DONE], read on to the end so the connection is reused
            async for data in sse.data_events(response.aiter_bytes()):
                if done or data == b"[DONE]":
                    done = True
                    continue
                if b'"usage":{' in data or b'"usage": {' in data:
                    try:
                        call.usage = Usage.from_openai(orjson.loads(data).get("usage")) or call.usage
                    except (orjson.JSONDecodeError, AttributeError):
                        pass
                yield b"data: " + data + b"\n\n"
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from None
        finally:
            await response.aclose()

    # ------------------------------------------------------------ operations
    async def chat(self, call: Call, deployment: Deployment) -> Reply:
        return await self._whole(call, deployment, "/chat/completions")

    def chat_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        return self._events(call, deployment, "/chat/completions")

    async def completion(self, call: Call, deployment: Deployment) -> Reply:
        return await self._whole(call, deployment, "/completions")

    def completion_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        return self._events(call, deployment, "/completions")

    async def embedding(self, call: Call, deployment: Deployment) -> Reply:
        return await self._whole(call, deployment, "/embeddings")

    async def list_models(self) -> list[str]:
        request = self.http.build_request("GET", self.base + "/models", headers=self.headers,
                                          params=self.params, timeout=10.0)
        response = await self._send(request)
        data: Any = parse_json(self.name, response.content).get("data")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] \
            if isinstance(data, list) else []


@hookimpl
def aiproxy_register_providers(register: Any) -> None:
    register("openai", OpenAIProvider)
