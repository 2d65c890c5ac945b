"""Any OpenAI-compatible upstream: OpenAI itself, vLLM, LM Studio, Azure OpenAI, …

The request goes out as the client sent it, with only ``model`` replaced; answers
and stream events come back byte for byte (usage is read from them, nothing is
re-encoded). Options:

- ``auth_header``: ``authorization`` (default, ``Bearer <api_key>``) or another header
  that takes the bare key, e.g. ``api-key`` for Azure;
- ``query``: query parameters for every request, e.g. ``{api-version: 2024-10-21}``;
- ``require_api_key``: false for local servers that take none (vLLM, LM Studio);
- ``stream_usage``: true (default) asks every stream for its usage
  (``stream_options.include_usage``) so the gateway counts exactly what a stream cost;
  the usage chunk is passed on only to clients that asked for it. False for servers
  that reject ``stream_options``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from aiproxy import hookimpl, sse, wire
from aiproxy.call import Usage
from aiproxy.config import ProviderConfig
from aiproxy.provider import Reply
from aiproxy.upstream import HTTPProvider, error_message, invalid_response, parse_json

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.router import Deployment


class OpenAIProvider(HTTPProvider):
    required = ("api_key",)
    default_base = "https://api.openai.com/v1"

    def __init__(self, config: ProviderConfig, http: httpx.AsyncClient) -> None:
        super().__init__(config, http)
        query = config.options.get("query")
        self.params = {str(k): str(v) for k, v in query.items()} if isinstance(query, dict) else None

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key
        if not key:
            return {}
        auth = str(self.config.options.get("auth_header", "authorization")).lower()
        return {auth: f"Bearer {key}" if auth == "authorization" else key}

    def missing(self) -> list[str]:
        if self.config.options.get("require_api_key") is False:  # vLLM, LM Studio, …
            return []
        return super().missing()

    def _body(self, call: Call) -> Any:
        body = call.body
        if body.get("model") != call.upstream_model:
            body = {**body, "model": call.upstream_model}
        if call.stream and not call.include_usage and self.config.options.get("stream_usage", True):
            body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        return body

    async def _whole(self, call: Call, deployment: Deployment, path: str) -> Reply:
        data, raw = await self.post_json(call, deployment, path, self._body(call))
        return Reply(data, raw=raw)

    async def _events(self, call: Call, deployment: Deployment, path: str) -> AsyncIterator[bytes]:
        async with self.streaming(self.build(call, deployment, path, self._body(call))) as response:
            if response.headers.get("content-type", "").startswith("application/json"):
                # Some servers ignore stream=true and answer whole: replay it as a stream.
                async for event in self._replayed(call, await response.aread()):
                    yield event
                return
            done = events = 0  # after [DONE], read on to the end so the connection is reused
            pass_usage = call.include_usage
            async for data in sse.data_events(response.aiter_bytes()):
                if done or data == b"[DONE]":
                    done = 1
                    continue
                if data.startswith(b'{"error"'):
                    raise self.stream_error(error_message(data)[0])
                if b'"usage":{' in data or b'"usage": {' in data:
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        chunk = None
                    if isinstance(chunk, dict):
                        call.usage = Usage.from_openai(chunk.get("usage")) or call.usage
                        if not pass_usage and chunk.get("choices") == []:
                            continue  # the usage chunk we asked for, not the client
                events += 1
                yield b"data: " + data + b"\n\n"
            if not events:
                raise invalid_response(self.name, "the stream ended without any event")

    async def _replayed(self, call: Call, raw: bytes) -> AsyncIterator[bytes]:
        data = parse_json(self.name, raw)
        if "error" in data:
            raise self.stream_error(error_message(raw)[0])
        call.usage = Usage.from_openai(data.get("usage"))
        for chunk in wire.replay_chunks(data, call.include_usage):
            yield sse.event(chunk)

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
        response = await self.send(self.build_get("/models"))
        data: Any = parse_json(self.name, response.content).get("data")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] \
            if isinstance(data, list) else []


@hookimpl
def aiproxy_register_providers(register: Any) -> None:
    register("openai", OpenAIProvider)
