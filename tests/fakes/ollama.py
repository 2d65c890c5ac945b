"""The fake Ollama: its native API as documented in ollama's ``docs/api.md``, JSON and NDJSON."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .server import (
    FakeUpstream,
    chat_words,
    count_words,
    embedding_vectors,
    message_text,
    spaced,
    tool_call,
    words_for,
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ollama_name(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


class FakeOllama(FakeUpstream):
    """Ollama's native API. ``models``: installed models (``name:tag``); others get 404."""

    MEDIA_TYPE = "application/x-ndjson"
    ROLES = frozenset(("system", "user", "assistant", "tool"))

    def __init__(self, *, models: Sequence[str] = ("llama3.2:latest", "nomic-embed-text:latest"),
                 **defaults: Any) -> None:
        super().__init__(**defaults)
        self.models = [_ollama_name(m) for m in models]

    def routes(self) -> list[Route]:
        return [
            Route("/", self.root, methods=["GET", "HEAD"]),
            Route("/api/version", self.version, methods=["GET"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
            Route("/api/embed", self.embed, methods=["POST"]),
            Route("/api/tags", self.tags, methods=["GET"]),
        ]

    @staticmethod
    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    # ------------------------------------------------------------ refusals (see FakeUpstream.begin)
    def refuse(self, request: Request, body: Any) -> Response | None:
        if not isinstance(body, dict):
            return self.error(400, "invalid character looking for beginning of value")
        return None

    def injected_error(self, status: int, headers: dict[str, str] | None) -> Response:
        return self.error(status, f"fake ollama error {status}", headers)

    def unknown_model(self, body: dict[str, Any]) -> Response | None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self.error(400, "model is required")
        if _ollama_name(model) not in self.models:
            return self.error(404, f"model '{model}' not found")
        return None

    def _check_messages(self, messages: Any) -> str | None:
        """What Ollama's JSON decoding would reject in ``messages``, else None."""
        if not isinstance(messages, list):
            return "json: cannot unmarshal messages into Go struct field ChatRequest.messages"
        for m in messages:
            if not isinstance(m, dict):
                return "json: cannot unmarshal message into Go struct field ChatRequest.messages"
            if m.get("role") not in self.ROLES:
                return f"invalid role: {m.get('role')!r}"
            if "content" in m and not isinstance(m["content"], str):
                return ("json: cannot unmarshal array into Go struct field Message.messages.content "
                        "of type string")
            for call in m.get("tool_calls") or []:
                args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                if not isinstance(args, dict):
                    return ("json: cannot unmarshal string into Go struct field "
                            "ToolCallFunction.messages.tool_calls.function.arguments of type "
                            "api.ToolCallFunctionArguments")
        return None

    # ------------------------------------------------------------ building blocks
    @staticmethod
    def _stats(prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
        return {"total_duration": 5_000_000 + eval_tokens * 1_000_000, "load_duration": 1_000_000,
                "prompt_eval_count": prompt_tokens, "prompt_eval_duration": 2_000_000,
                "eval_count": eval_tokens, "eval_duration": eval_tokens * 1_000_000}

    @staticmethod
    def frame(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def _num_predict(body: dict[str, Any]) -> int | None:
        value = (body.get("options") or {}).get("num_predict")
        return value if isinstance(value, int) and value >= 0 else None

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.9.0"})

    # ------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        messages = body.get("messages")
        problem = self._check_messages(messages)
        if problem:
            return self.error(400, problem)
        model = body["model"]
        prompt_tokens = count_words(message_text(messages))
        call = tool_call(body)
        tool_calls: list[dict[str, Any]] = []
        if call is not None:
            name, arguments = call
            tool_calls = [{"function": {"name": name, "arguments": arguments}}]
            words, reason, eval_count = [], "stop", count_words(json.dumps(arguments))
        else:
            words, cut = chat_words(messages, opts, self._num_predict(body))
            reason, eval_count = "length" if cut else "stop", len(words)
        stats = self._stats(prompt_tokens, eval_count)

        if body.get("stream", True) is False:
            await self.pause(opts)
            message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
            if tool_calls:
                message["tool_calls"] = tool_calls
            return JSONResponse({"model": model, "created_at": _now(), "message": message,
                                 "done_reason": reason, "done": True, **stats})
        pieces = []
        if tool_calls:
            pieces.append(self.frame({"model": model, "created_at": _now(), "message": {
                "role": "assistant", "content": "", "tool_calls": tool_calls}, "done": False}))
        pieces.extend(self.frame({"model": model, "created_at": _now(), "message": {
            "role": "assistant", "content": piece}, "done": False}) for piece in spaced(words))
        pieces.append(self.frame({"model": model, "created_at": _now(),
                                  "message": {"role": "assistant", "content": ""},
                                  "done_reason": reason, "done": True, **stats}))
        return self.stream(record, pieces, opts)

    # ------------------------------------------------------------ generate
    async def generate(self, request: Request) -> Response:
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            return self.error(400, "json: cannot unmarshal array into Go struct field "
                                   "GenerateRequest.prompt of type string")
        model = body["model"]
        if not prompt:  # Ollama's "load a model" request
            return JSONResponse({"model": model, "created_at": _now(), "response": "", "done": True,
                                 "done_reason": "load"})
        words, cut = words_for(prompt, opts, self._num_predict(body))
        reason = "length" if cut else "stop"
        stats = self._stats(count_words(prompt), len(words))
        if body.get("stream", True) is False:
            await self.pause(opts)
            return JSONResponse({"model": model, "created_at": _now(), "response": " ".join(words),
                                 "done": True, "done_reason": reason, "context": [1, 2, 3], **stats})
        pieces = [self.frame({"model": model, "created_at": _now(), "response": piece, "done": False})
                  for piece in spaced(words)]
        pieces.append(self.frame({"model": model, "created_at": _now(), "response": "", "done": True,
                                  "done_reason": reason, "context": [1, 2, 3], **stats}))
        return self.stream(record, pieces, opts)

    # ------------------------------------------------------------ embed and tags
    async def embed(self, request: Request) -> Response:
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        await self.pause(opts)
        body: dict[str, Any] = record.body
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            return self.error(400, "invalid input type")
        return JSONResponse({"model": body["model"], "embeddings": embedding_vectors(inputs, body, opts),
                             "total_duration": 14_143_917, "load_duration": 1_019_500,
                             "prompt_eval_count": sum(count_words(x) for x in inputs)})

    async def tags(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse({"models": [{
            "name": m, "model": m, "modified_at": "2025-05-10T08:06:48.639712648-07:00",
            "size": 2019393189, "digest": hashlib.sha256(m.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                        "parameter_size": "3.2B", "quantization_level": "Q4_K_M"},
        } for m in self.models]})
