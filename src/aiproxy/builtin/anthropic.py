"""Anthropic's Messages API (``POST {api_base}/messages``), for OpenAI-shaped chat requests.

The request is translated by :mod:`.anthropic_wire` (system and developer messages →
``system``, tools and tool results, images, stop sequences, JSON schemas, ``max_tokens``
with a default); the answer comes back through :mod:`.anthropic_reply` as a
``chat.completion``, and a stream's events as ``chat.completion.chunk`` events, each sent
when its upstream event arrives. The wire is spoken over the gateway's shared httpx client (the SDK's own
client would be a second connection pool, and retries are the router's); the SDK's
types are the field-name authority. Options (provider or model):

- ``max_tokens``: sent when the client sets neither ``max_tokens`` nor
  ``max_completion_tokens`` (Anthropic requires one; default 4096);
- ``anthropic_version`` (default ``2023-06-01``), ``anthropic_beta`` (a string or a list,
  sent as the ``anthropic-beta`` header);
- ``drop_params``: OpenAI fields to drop for this model, e.g. ``[temperature, top_p]`` for
  models that reject sampling parameters; ``extra_fields``: more request fields to pass
  as they are (``top_k`` and ``thinking`` always are).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from aiproxy import hookimpl, sse, wire
from aiproxy.builtin import anthropic_wire as aw
from aiproxy.builtin.anthropic_reply import StreamTranslator, completion, read_usage
from aiproxy.errors import ProxyError
from aiproxy.provider import Reply
from aiproxy.upstream import HTTPProvider, error_message, invalid_response, parse_json, scrub

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.router import Deployment

API_VERSION = "2023-06-01"
_MODEL_PAGES = 10


class AnthropicProvider(HTTPProvider):
    required = ("api_key",)
    default_base = "https://api.anthropic.com/v1"

    def auth_headers(self) -> dict[str, str]:
        options = self.config.options
        headers = {"anthropic-version": str(options.get("anthropic_version") or API_VERSION)}
        if self.config.api_key:
            headers["x-api-key"] = self.config.api_key
        beta = _beta(options.get("anthropic_beta"))
        if beta:
            headers["anthropic-beta"] = beta
        return headers

    def _request(self, call: Call, deployment: Deployment, path: str, body: dict[str, Any]) -> httpx.Request:
        request = self.build(call, deployment, path, body)
        beta = deployment.options.get("anthropic_beta")
        if beta is not None and beta != self.config.options.get("anthropic_beta"):
            request.headers["anthropic-beta"] = _beta(beta)  # a model's own betas
        return request

    # ------------------------------------------------------------ operations
    async def chat(self, call: Call, deployment: Deployment) -> Reply:
        body = aw.request(call.body, call.upstream_model, deployment.options, stream=False)
        response = await self.send(self._request(call, deployment, "/messages", body))
        data = parse_json(self.name, response.content)
        if data.get("type") != "message":
            raise invalid_response(self.name, "expected a message")
        reply = completion(data, int(time.time()))
        call.usage = read_usage(data.get("usage"))
        return Reply(reply)

    def chat_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        body = aw.request(call.body, call.upstream_model, deployment.options, stream=True)
        return self._events(call, self._request(call, deployment, "/messages", body))

    async def _events(self, call: Call, request: httpx.Request) -> AsyncIterator[bytes]:
        state = StreamTranslator(call, int(time.time()))
        async with self.streaming(request) as response:
            if response.headers.get("content-type", "").startswith("application/json"):
                async for event in self._replayed(call, await response.aread()):
                    yield event  # an upstream that answered whole: replayed as a stream
                return
            async for data in sse.data_events(response.aiter_bytes()):
                if state.done:
                    continue  # read on to the end, so the connection is reused
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise invalid_response(self.name, "a stream event is not JSON") from None
                if not isinstance(event, dict):
                    raise invalid_response(self.name, "a stream event is not an object")
                if event.get("type") == "error":
                    raise self._stream_failure(data)
                for chunk in state.feed(event):
                    yield sse.event(chunk)
            if not state.done:
                raise invalid_response(self.name, "the stream ended before message_stop")

    async def _replayed(self, call: Call, raw: bytes) -> AsyncIterator[bytes]:
        data = parse_json(self.name, raw)
        if data.get("type") != "message":
            raise invalid_response(self.name, "expected a message")
        call.usage = read_usage(data.get("usage"))
        for chunk in wire.replay_chunks(completion(data, int(time.time())), call.include_usage):
            yield sse.event(chunk)

    def _stream_failure(self, data: bytes) -> ProxyError:
        """An ``error`` event: overloaded → 503, rate limited → 429, anything else → 502."""
        message, err = error_message(data)
        kind = err.get("type")
        text = scrub(message or "no message", self.secrets())
        if kind == "overloaded_error":
            return ProxyError(503, f"provider {self.name!r} is overloaded: {text}",
                              type="service_unavailable", code="upstream_unavailable")
        if kind == "rate_limit_error":
            return ProxyError(429, text, type="rate_limit_error", code="rate_limit_exceeded")
        return self.stream_error(message)

    async def count_tokens(self, call: Call, deployment: Deployment) -> int:
        body = aw.count_tokens_request(call.body, call.upstream_model)
        response = await self.send(self._request(call, deployment, "/messages/count_tokens", body))
        tokens = parse_json(self.name, response.content).get("input_tokens")
        if type(tokens) is not int:
            raise invalid_response(self.name, "expected input_tokens")
        return tokens

    async def list_models(self) -> list[str]:
        ids: list[str] = []
        after = ""
        for _ in range(_MODEL_PAGES):
            query = "?limit=1000" + (f"&after_id={after}" if after else "")
            data = parse_json(self.name, (await self.send(self.build_get("/models" + query))).content)
            models = data.get("data")
            if not isinstance(models, list):
                break
            ids.extend(m["id"] for m in models if isinstance(m, dict) and isinstance(m.get("id"), str))
            after = str(data.get("last_id") or "")
            if not data.get("has_more") or not after:
                break
        return ids


def _beta(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value) if value else ""


@hookimpl
def aiproxy_register_providers(register: Any) -> None:
    register("anthropic", AnthropicProvider)

