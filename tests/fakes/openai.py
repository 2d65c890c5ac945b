"""The fake OpenAI-compatible upstream: chat, completions, embeddings and models, JSON and SSE."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .server import (
    FakeUpstream,
    Recorded,
    chat_words,
    count_words,
    embedding_vectors,
    message_text,
    spaced,
    tool_call,
    words_for,
)

DONE = b"data: [DONE]\n\n"


class FakeOpenAI(FakeUpstream):
    """An OpenAI-compatible upstream. ``models``: ids it serves and lists; others get 404."""

    MEDIA_TYPE = "text/event-stream"

    def __init__(self, *, models: Sequence[str] = ("gpt-4o-mini", "text-embedding-3-small"),
                 api_key: str | None = None, **defaults: Any) -> None:
        super().__init__(**defaults)
        self.models = list(models)
        self.api_key = api_key

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
        ]

    @staticmethod
    def error(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
              param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                            status_code=status, headers=headers)

    # ------------------------------------------------------------ refusals (see FakeUpstream.begin)
    def _unauthorized(self, request: Request) -> Response | None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def refuse(self, request: Request, body: Any) -> Response | None:
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        if not isinstance(body, dict):
            return self.error(400, "We could not parse the JSON body of your request.")
        return None

    def injected_error(self, status: int, headers: dict[str, str] | None) -> Response:
        kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else \
            "invalid_request_error"
        return self.error(status, f"fake upstream error {status}", type=kind, headers=headers)

    def unknown_model(self, body: dict[str, Any]) -> Response | None:
        model = body.get("model")
        if model not in self.models:
            return self.error(404, f"The model `{model}` does not exist or you do not have access to it.",
                              code="model_not_found")
        return None

    # ------------------------------------------------------------ building blocks
    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _limit(value: Any) -> int | None:
        return int(value) if isinstance(value, int) else None

    @staticmethod
    def _wants_usage(body: dict[str, Any]) -> bool:
        return bool((body.get("stream_options") or {}).get("include_usage"))

    @staticmethod
    def frame(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    # ------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        messages = body.get("messages") or []
        prompt_tokens = count_words(message_text(messages))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        call = tool_call(body)
        cid = f"chatcmpl-fake{len(self.requests)}"
        created = int(time.time())
        model = body["model"]
        tool_calls: list[dict[str, Any]] = []
        if call is not None:
            name, arguments = call[0], json.dumps(call[1])
            tool_calls = [{"id": f"call_fake{len(self.requests)}", "type": "function",
                           "function": {"name": name, "arguments": arguments}}]
            text, finish, completion_tokens = None, "tool_calls", count_words(arguments)
        else:
            words, cut = chat_words(messages, opts, self._limit(limit))
            text, finish, completion_tokens = " ".join(words), "length" if cut else "stop", len(words)
        usage = self._usage(prompt_tokens, completion_tokens)
        if body.get("stream") is True and opts.get("script"):
            return self._scripted(record, opts, cid, created, model, usage, self._wants_usage(body))

        if body.get("stream") is not True:
            await self.pause(opts)
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage, "system_fingerprint": "fp_fake"})

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return self.frame({"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": model, "system_fingerprint": "fp_fake",
                               "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish_reason}]})

        pieces = [chunk({"role": "assistant", "content": "" if text is not None else None,
                         "refusal": None})]
        for i, tc in enumerate(tool_calls):
            args = tc["function"]["arguments"]
            pieces.append(chunk({"tool_calls": [{"index": i, "id": tc["id"], "type": "function",
                                                 "function": {"name": tc["function"]["name"],
                                                              "arguments": ""}}]}))
            half = len(args) // 2
            for part in (args[:half], args[half:]):
                pieces.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": part}}]}))
        if text is not None:
            pieces.extend(chunk({"content": piece}) for piece in spaced(text.split(" ")))
        pieces.append(chunk({}, finish))
        if self._wants_usage(body):
            pieces.append(self.frame({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": model, "system_fingerprint": "fp_fake", "choices": [],
                                      "usage": usage}))
        pieces.append(DONE)
        return self.stream(record, pieces, opts)

    def _scripted(self, record: Recorded, opts: dict[str, Any], cid: str, created: int, model: str,
                  usage: dict[str, int], wants_usage: bool) -> Response:
        """The ``script`` option: a stream of exactly these choices (``delta``, ``logprobs``,
        ``finish_reason``; ``index`` 0 unless given), each in a chunk of its own."""
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_fake"}
        pieces = [self.frame({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": None, **choice}]})
                  for choice in opts["script"]]
        if wants_usage:
            pieces.append(self.frame({**head, "choices": [], "usage": usage}))
        pieces.append(DONE)
        return self.stream(record, pieces, opts)

    # ------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        prompt = body.get("prompt")
        prompt_text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
        words, cut = words_for(prompt_text, opts, self._limit(body.get("max_tokens")))
        finish = "length" if cut else "stop"
        usage = self._usage(count_words(prompt_text), len(words))
        cid, created, model = f"cmpl-fake{len(self.requests)}", int(time.time()), body["model"]

        def completion(text: str, finish_reason: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None,
                                 "finish_reason": finish_reason}]}

        if body.get("stream") is not True:
            await self.pause(opts)
            return JSONResponse({**completion(" ".join(words), finish), "usage": usage})
        pieces = [self.frame(completion(piece, None)) for piece in spaced(words)]
        pieces.append(self.frame(completion("", finish)))
        if self._wants_usage(body):
            pieces.append(self.frame({**completion("", None), "choices": [], "usage": usage}))
        pieces.append(DONE)
        return self.stream(record, pieces, opts)

    # ------------------------------------------------------------ embeddings and models
    async def embeddings(self, request: Request) -> Response:
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        await self.pause(opts)
        body: dict[str, Any] = record.body
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw or [])
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        for i, v in enumerate(embedding_vectors(inputs, body, opts)):
            encoded: Any = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if as_b64 else v
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = sum(count_words(x) if isinstance(x, str) else len(x) for x in inputs)
        return JSONResponse({"object": "list", "data": data, "model": body["model"],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def list_models(self, request: Request) -> Response:
        await self.record(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in self.models]})
