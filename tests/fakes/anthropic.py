"""The fake Anthropic upstream: the Messages API (``/v1/messages``, ``/v1/messages/count_tokens``,
``/v1/models``) as documented, JSON and SSE (``event: <type>`` + ``data: <json>``).

It refuses what the real API refuses (a missing ``x-api-key`` or ``anthropic-version``,
fields it does not know, roles other than user/assistant, empty text blocks, a
``tool_result`` without its ``tool_use`` in the turn before, unsupported image types) with
Anthropic's error shape. Besides the shared options (:mod:`.server`) it takes
``cache_read`` and ``cache_write`` (tokens reported as read from and written to the prompt
cache, in ``message_start`` and again in ``message_delta`` as the API does), ``stream_error``
(an ``error`` event of that type, e.g. ``overloaded_error``, after the first text delta)
and ``gate`` (a :class:`threading.Event`, through :meth:`configured`: a stream sends its
first event, then waits for the gate before the rest).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from anthropic.types.message_create_params import MessageCreateParamsBase
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .server import FakeUpstream, Recorded, count_words, example_arguments, spaced, words_for

#: Every top-level field the Messages API takes: the SDK's, plus sampling fields
#: that older models accept and the SDK no longer lists.
FIELDS = frozenset(MessageCreateParamsBase.__annotations__) | {"stream", "temperature", "top_p", "top_k"}
IMAGE_TYPES = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
MODELS = ("claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 529: "overloaded_error"}


class FakeAnthropic(FakeUpstream):
    """An Anthropic upstream. ``models``: ids it serves and lists; others get 404.
    ``extra_fields``: request fields it accepts beyond the API's (``fake`` for options)."""

    MEDIA_TYPE = "text/event-stream"

    def __init__(self, *, models: Sequence[str] = MODELS, api_key: str | None = None,
                 extra_fields: Sequence[str] = ("fake",), **defaults: Any) -> None:
        super().__init__(**{"cache_read": 0, "cache_write": 0, "stream_error": None, **defaults})
        self.models = list(models)
        self.api_key = api_key
        self.fields = FIELDS | set(extra_fields)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
        ]

    @staticmethod
    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                                       "message": message},
                             "request_id": "req_fake0123456789"}, status_code=status, headers=headers)

    # ------------------------------------------------------------ refusals (see FakeUpstream.begin)
    def _unauthorized(self, request: Request) -> Response | None:
        if self.api_key and request.headers.get("x-api-key") != self.api_key:
            return self.error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self.error(400, "anthropic-version: header is required")
        return None

    def refuse(self, request: Request, body: Any) -> Response | None:
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        if not isinstance(body, dict):
            return self.error(400, "invalid request: the body must be a JSON object")
        counting = request.url.path.endswith("/count_tokens")
        for key in body:
            if key not in self.fields or (counting and key in ("max_tokens", "stream", "stop_sequences")):
                return self.error(400, f"{key}: Extra inputs are not permitted")
        if not counting and type(body.get("max_tokens")) is not int:
            return self.error(400, "max_tokens: Field required")
        problem = self._check_messages(body.get("messages"))
        return self.error(400, problem) if problem else None

    def injected_error(self, status: int, headers: dict[str, str] | None) -> Response:
        message = "Overloaded" if status == 529 else f"fake anthropic error {status}"
        return self.error(status, message, headers)

    def unknown_model(self, body: dict[str, Any]) -> Response | None:
        if body.get("model") not in self.models:
            return self.error(404, f"model: {body.get('model')}")
        return None

    @staticmethod
    def _check_messages(messages: Any) -> str | None:
        """What the real API would reject in ``messages``, else None."""
        if not isinstance(messages, list) or not messages:
            return "messages: Field required"
        tool_ids: set[str] = set()
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list) or not blocks:
                return f"messages.{i}: all messages must have non-empty content"
            seen_other = False
            for j, block in enumerate(blocks):
                kind = block.get("type") if isinstance(block, dict) else None
                where = f"messages.{i}.content.{j}"
                if kind == "text" and not block.get("text"):
                    return f"{where}: text content blocks must be non-empty"
                if kind == "image" and block["source"].get("type") == "base64" \
                        and block["source"].get("media_type") not in IMAGE_TYPES:
                    return f"{where}.image.source.base64.media_type: Input should be one of " \
                           f"{sorted(IMAGE_TYPES)}"
                if kind == "tool_result":
                    if m["role"] != "user" or block.get("tool_use_id") not in tool_ids or seen_other:
                        return f"{where}: unexpected `tool_use_id` found in `tool_result` blocks"
                else:
                    seen_other = True
                if kind not in ("text", "image", "document", "tool_use", "tool_result", "thinking"):
                    return f"{where}.type: Input tag {kind!r} found using 'type' does not match " \
                           f"any expected tags"
            if m["role"] == "assistant":
                tool_ids = {b["id"] for b in blocks if b.get("type") == "tool_use"}
        return None

    # ------------------------------------------------------------ building blocks
    @staticmethod
    def frame(obj: Any) -> bytes:
        return f"event: {obj['type']}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

    @staticmethod
    def _tool(body: dict[str, Any]) -> dict[str, Any] | None:
        """The tool to call: the chosen one, else the first; none after a tool result."""
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {}
        last = body["messages"][-1]
        after_result = isinstance(last.get("content"), list) and any(
            b.get("type") == "tool_result" for b in last["content"])
        if not tools or choice.get("type") == "none" or after_result:
            return None
        if choice.get("type") == "tool":
            return next((t for t in tools if t["name"] == choice["name"]), None)
        return dict(tools[0])

    @staticmethod
    def _prompt_text(body: dict[str, Any]) -> str:
        parts: list[str] = []
        system = body.get("system")
        if isinstance(system, str):
            parts.append(system)
        elif isinstance(system, list):
            parts.extend(b.get("text", "") for b in system)
        for m in body.get("messages") or []:
            content = m["content"]
            for b in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if b.get("type") == "text":
                    parts.append(b["text"])
                elif b.get("type") == "tool_result":
                    result = b.get("content")
                    parts.append(result if isinstance(result, str) else json.dumps(result))
        return " ".join(parts)

    @staticmethod
    def _tool_result(body: dict[str, Any]) -> str | None:
        last = body["messages"][-1]["content"]
        results = [b for b in last if b.get("type") == "tool_result"] if isinstance(last, list) else []
        return f"The tool said {results[-1].get('content')}" if results else None

    # ------------------------------------------------------------ messages
    async def messages(self, request: Request) -> Response:
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        prompt = self._prompt_text(body)
        tool = self._tool(body)
        count = len(self.requests)
        msg_id = f"msg_fake{count:04d}"
        cache_read, cache_write = int(opts.get("cache_read") or 0), int(opts.get("cache_write") or 0)
        if tool is not None:
            arguments = example_arguments(tool.get("input_schema"))
            tool_id = f"toolu_fake{count:04d}"
            words: list[str] = []
            stop, output = "tool_use", count_words(json.dumps(arguments))
        else:
            quoted = self._tool_result(body)
            words, cut = words_for(prompt, {**opts, "reply": quoted} if quoted else opts, body["max_tokens"])
            stop, output = ("max_tokens" if cut else "end_turn"), len(words)
        usage = {"input_tokens": count_words(prompt), "cache_creation_input_tokens": cache_write,
                 "cache_read_input_tokens": cache_read, "output_tokens": output}
        message: dict[str, Any] = {"id": msg_id, "type": "message", "role": "assistant",
                                   "model": body["model"], "content": [], "stop_reason": stop,
                                   "stop_sequence": None, "usage": usage}
        if body.get("stream") is not True:
            await self.pause(opts)
            if words:
                message["content"].append({"type": "text", "text": " ".join(words)})
            if tool is not None:
                message["content"].append({"type": "tool_use", "id": tool_id, "name": tool["name"],
                                           "input": arguments})
            return JSONResponse(message)

        start = {**message, "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        pieces = [self.frame({"type": "message_start", "message": start}), self.frame({"type": "ping"})]
        index = 0
        if words:
            pieces.append(self.frame({"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}))
            for i, piece in enumerate(spaced(words)):
                pieces.append(self.frame({"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": piece}}))
                if i == 0 and opts.get("stream_error"):
                    pieces.append(self.frame({"type": "error", "error": {
                        "type": opts["stream_error"], "message": "Overloaded"}}))
                    return self.stream(record, pieces, opts)
            pieces.append(self.frame({"type": "content_block_stop", "index": 0}))
            index = 1
        if tool is not None:
            raw = json.dumps(arguments)
            pieces.append(self.frame({"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": tool_id, "name": tool["name"], "input": {}}}))
            half = len(raw) // 2
            for part in ("", raw[:half], raw[half:]):
                pieces.append(self.frame({"type": "content_block_delta", "index": index,
                                          "delta": {"type": "input_json_delta", "partial_json": part}}))
            pieces.append(self.frame({"type": "content_block_stop", "index": index}))
        pieces.append(self.frame({"type": "message_delta", "usage": {**usage, "output_tokens": output},
                                  "delta": {"stop_reason": stop, "stop_sequence": None}}))
        pieces.append(self.frame({"type": "message_stop"}))
        gate = opts.get("gate")
        if isinstance(gate, threading.Event):
            return self._gated(record, pieces, gate)
        return self.stream(record, pieces, opts)

    def _gated(self, record: Recorded, pieces: list[bytes], gate: threading.Event) -> StreamingResponse:
        """The first piece, then the rest once ``gate`` is set (or 10 s have passed)."""
        record.streamed = True
        record.chunks_total = len(pieces)

        async def body() -> AsyncIterator[bytes]:
            try:
                for i, piece in enumerate(pieces):
                    if i == 1:
                        await asyncio.to_thread(gate.wait, 10)
                    if i == len(pieces) - 1:
                        record.completed = True
                    yield piece
                    record.chunks_sent = i + 1
            except BaseException:
                if not record.completed:
                    record.disconnected = True
                raise
            finally:
                record.done.set()

        return StreamingResponse(body(), media_type=self.MEDIA_TYPE, headers={"cache-control": "no-cache"})

    async def count_tokens(self, request: Request) -> Response:
        record, _, failed = await self.begin(request)
        if failed is not None:
            return failed
        return JSONResponse({"input_tokens": count_words(self._prompt_text(record.body))})

    async def list_models(self, request: Request) -> Response:
        await self.record(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-09-29T00:00:00Z",
                 "lifecycle": "active"} for m in self.models]
        return JSONResponse({"data": data, "has_more": False, "first_id": self.models[0],
                             "last_id": self.models[-1]})
