"""Google's Gemini API: ``generateContent``, ``streamGenerateContent`` (SSE), ``embedContent``,
``batchEmbedContents``, ``countTokens`` and ``GET /models``.

The wire is spoken over the gateway's shared httpx client: the google-genai SDK brings
its own HTTP stack, and its pydantic models would cost a validation per event on the
hot path. Its types are still the authority for every field name (the tests validate
the bodies built here, and the fake's answers, against ``google.genai.types``).

The key goes in the ``x-goog-api-key`` header, never in the URL, so it cannot reach a
log line. Translation both ways lives in :mod:`.google_wire` (requests) and
:mod:`.google_reply` (answers, errors); the README's provider table lists each field.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import httpx

from aiproxy import hookimpl, sse, wire
from aiproxy.builtin import google_reply as reply
from aiproxy.builtin.google_wire import chat_body, completion_body, embed_parts, model_path
from aiproxy.call import Usage
from aiproxy.provider import Reply
from aiproxy.upstream import HTTPProvider, error_message, invalid_response, parse_json

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.errors import ProxyError
    from aiproxy.router import Deployment

_STREAM = "streamGenerateContent?alt=sse"
#: Gemini takes at most this many requests in one ``batchEmbedContents``.
BATCH = 100
#: Methods a listed model must support to be offered (when the listing says).
_SERVED = frozenset(("generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents"))
#: Pages of ``GET /models`` read at most (1000 models a page).
MODEL_PAGES = 10


class GoogleProvider(HTTPProvider):
    required = ("api_key",)
    default_base = "https://generativelanguage.googleapis.com/v1beta"

    def auth_headers(self) -> dict[str, str]:
        key = self.config.api_key
        return {"x-goog-api-key": key} if key else {}

    def error_for(self, status: int, body: bytes, headers: httpx.Headers,
                  secrets: Iterable[str | None]) -> ProxyError:
        """Gemini's error details (retry delay, bad key) read into the ProxyError."""
        return reply.google_error(self.name, status, body, headers, secrets)

    def _path(self, call: Call, method: str) -> str:
        return f"/{model_path(call.upstream_model)}:{method}"

    # ------------------------------------------------------------ chat and text completions
    async def chat(self, call: Call, deployment: Deployment) -> Reply:
        return await self._whole(call, deployment, chat_body(call.body), reply.chat_completion)

    def chat_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        body = chat_body(call.body)  # a bad request fails before anything is sent
        return self._events(call, self.build(call, deployment, self._path(call, _STREAM), body),
                            reply.Chunks(call.upstream_model))

    async def completion(self, call: Call, deployment: Deployment) -> Reply:
        return await self._whole(call, deployment, completion_body(call.body), reply.text_completion)

    def completion_stream(self, call: Call, deployment: Deployment) -> AsyncIterator[bytes]:
        body = completion_body(call.body)
        return self._events(call, self.build(call, deployment, self._path(call, _STREAM), body),
                            reply.Chunks(call.upstream_model, text=True))

    async def _whole(self, call: Call, deployment: Deployment, body: dict[str, Any],
                     translate: Callable[[dict[str, Any], str], dict[str, Any]]) -> Reply:
        data, _ = await self.post_json(call, deployment, self._path(call, "generateContent"), body)
        out = translate(data, call.upstream_model)
        if not out["choices"]:
            raise invalid_response(self.name, "no candidates")
        call.usage = Usage.from_openai(out.get("usage"))
        return Reply(out)

    async def _events(self, call: Call, request: httpx.Request,
                      chunks: reply.Chunks) -> AsyncIterator[bytes]:
        """Each upstream event out as OpenAI chunks the moment it arrives."""
        async with self.streaming(request) as response:
            async for data in sse.data_events(response.aiter_bytes()):
                event = parse_json(self.name, data)
                if "error" in event:
                    raise self.stream_error(error_message(data)[0])
                out = chunks.feed(event)
                if chunks.usage is not None:
                    call.usage = Usage.from_openai(chunks.usage)
                for chunk in out:
                    yield sse.event(chunk)
        if not chunks.events:
            raise invalid_response(self.name, "the stream ended without any event")
        if not chunks.finished:
            raise invalid_response(self.name, "the stream ended before its finish reason")
        if call.include_usage and chunks.usage is not None:
            yield sse.event(chunks.usage_chunk())

    # ------------------------------------------------------------ embeddings, tokens, models
    async def embedding(self, call: Call, deployment: Deployment) -> Reply:
        texts = embed_parts(call.body)
        dims = call.body.get("dimensions")
        if isinstance(call.body.get("input"), str):
            body: dict[str, Any] = {"content": {"parts": [{"text": texts[0]}]}}
            if dims is not None:
                body["outputDimensionality"] = dims
            data, _ = await self.post_json(call, deployment, self._path(call, "embedContent"), body)
            vectors = [_values(data.get("embedding"))]
        else:
            batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]
            tasks = [asyncio.ensure_future(self._batch(call, deployment, b, dims)) for b in batches]
            try:
                answers = await asyncio.gather(*tasks)
            finally:  # one batch failed (or the client left): stop paying for the others
                for task in tasks:
                    task.cancel()
            vectors = [v for answer in answers for v in answer]
        if len(vectors) != len(texts) or any(v is None for v in vectors):
            raise invalid_response(self.name, "expected one embedding per input")
        return Reply(wire.embedding_list(model=call.upstream_model, vectors=vectors,  # type: ignore[arg-type]
                                         encoding_format=call.body.get("encoding_format"),
                                         prompt_tokens=0))

    async def _batch(self, call: Call, deployment: Deployment, texts: list[str],
                     dims: Any) -> list[list[float] | None]:
        name = model_path(call.upstream_model)
        requests = [{"model": name, "content": {"parts": [{"text": t}]}} for t in texts]
        if dims is not None:
            for r in requests:
                r["outputDimensionality"] = dims
        data, _ = await self.post_json(call, deployment, self._path(call, "batchEmbedContents"),
                                       {"requests": requests})
        embeddings = data.get("embeddings")
        if not isinstance(embeddings, list) or len(embeddings) != len(texts):
            raise invalid_response(self.name, "expected one embedding per input")
        return [_values(e) for e in embeddings]

    async def count_tokens(self, call: Call, deployment: Deployment) -> int:
        body = chat_body(call.body)
        request = {"generateContentRequest": {"model": model_path(call.upstream_model), **body}}
        data, _ = await self.post_json(call, deployment, self._path(call, "countTokens"), request)
        total = data.get("totalTokens")
        if type(total) is not int:
            raise invalid_response(self.name, "no totalTokens")
        return total

    async def list_models(self) -> list[str]:
        """Model ids (without ``models/``) that can ``generateContent`` or embed."""
        out: list[str] = []
        token: str | None = None
        for _ in range(MODEL_PAGES):
            params = {"pageSize": "1000", **({"pageToken": token} if token else {})}
            request = self.http.build_request("GET", self.base + "/models", headers=self.headers,
                                              params=params, timeout=10.0)
            data = parse_json(self.name, (await self.send(request)).content)
            for m in data.get("models") or []:
                name = m.get("name") if isinstance(m, dict) else None
                methods = m.get("supportedGenerationMethods") if isinstance(m, dict) else None
                if isinstance(name, str) and (not isinstance(methods, list) or _SERVED & set(methods)):
                    out.append(name.removeprefix("models/"))
            token = data.get("nextPageToken")
            if not isinstance(token, str) or not token:
                break
        return out


def _values(embedding: Any) -> list[float] | None:
    values = embedding.get("values") if isinstance(embedding, dict) else None
    return values if isinstance(values, list) else None


@hookimpl
def aiproxy_register_providers(register: Any) -> None:
    register("google", GoogleProvider)
