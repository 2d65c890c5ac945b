"""The fake Gemini API (``/v1beta``), as documented at ai.google.dev/api, JSON and SSE.

Every request body is checked against ``google.genai.types`` (extra fields forbidden,
as Gemini rejects unknown names), turns must alternate between ``user`` and ``model``,
and a turn of function responses must answer every call of the turn before it — what
the real API refuses, this fake refuses with Gemini's own error shape. The first function
call of an answer carries a thought signature, which must come back with it (as Gemini 3
requires). The key must come in ``x-goog-api-key``; one in the URL (``?key=``) is refused.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from google.genai import types
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .server import FakeUpstream, count_words, example_arguments, spaced, vector, words_for

_BODY = {"contents": types.Content, "systemInstruction": types.Content,
         "generationConfig": types.GenerationConfig, "toolConfig": types.ToolConfig}
_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
           500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def gemini_error(status: int, message: str, details: Sequence[dict[str, Any]] = ()) -> JSONResponse:
    error = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    if details:
        error["details"] = list(details)
    return JSONResponse({"error": error}, status_code=status)


def signature(name: str) -> str:
    """The thought signature the fake puts on (and expects back on) a first call of ``name``."""
    return base64.b64encode(f"fake-thought:{name}".encode()).decode()


def _texts(contents: list[dict[str, Any]]) -> str:
    return " ".join(str(p["text"]) for c in contents for p in c.get("parts", []) if "text" in p)


class FakeGemini(FakeUpstream):
    """The Gemini API. ``models``: ids it serves and lists; others get 404."""

    MEDIA_TYPE = "text/event-stream"

    def __init__(self, *, models: Sequence[str] = ("gemini-2.5-flash", "gemini-embedding-001"),
                 api_key: str = "fake-gemini-key", **defaults: Any) -> None:
        super().__init__(**defaults)
        self.models = list(models)
        self.api_key = api_key

    def routes(self) -> list[Route]:
        return [Route("/v1beta/models", self.list_models, methods=["GET"]),
                Route("/v1beta/models/{rest:path}", self.dispatch, methods=["POST"])]

    # ------------------------------------------------------------ refusals (see FakeUpstream.begin)
    def _unauthorized(self, request: Request) -> Response | None:
        if "key" in request.query_params:
            return gemini_error(400, "the fake refuses keys in the URL: they end up in logs")
        key = request.headers.get("x-goog-api-key")
        if key is None:
            return gemini_error(403, "Method doesn't allow unregistered callers (callers without established "
                                     "identity). Please use API Key or other form of API consumer identity.")
        if key != self.api_key:
            return gemini_error(400, "API key not valid. Please pass a valid API key.", [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com"}])
        return None

    def refuse(self, request: Request, body: Any) -> Response | None:
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        if not isinstance(body, dict):
            return gemini_error(400, "Invalid JSON payload received.")
        return None

    def injected_error(self, status: int, headers: dict[str, str] | None) -> Response:
        details = []
        if status == 429 and headers and "retry-after" in headers:  # Gemini says it in the body
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                            "retryDelay": f"{headers['retry-after']}s"})
        return gemini_error(status, f"fake gemini error {status}", details)

    def unknown_model(self, body: dict[str, Any]) -> Response | None:
        return None  # the model is in the URL: see dispatch

    # ------------------------------------------------------------ requests
    async def dispatch(self, request: Request) -> Response:
        model, _, method = request.path_params["rest"].rpartition(":")
        record, opts, failed = await self.begin(request)
        if failed is not None:
            return failed
        if model not in self.models:
            return gemini_error(404, f"models/{model} is not found for API version v1beta, or is not "
                                     f"supported for {method}.")
        if method in ("generateContent", "streamGenerateContent"):
            return await self.generate(request, record, opts, model, method == "streamGenerateContent")
        if method in ("embedContent", "batchEmbedContents"):
            return await self.embed(record.body, opts, model, method == "batchEmbedContents")
        return gemini_error(404, f"method {method} not found")

    @staticmethod
    def check(body: dict[str, Any]) -> str | None:
        """What Gemini would refuse in a generateContent body, else None."""
        for key, value in body.items():
            if key not in (*_BODY, "tools", "safetySettings", "cachedContent"):
                return f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
            try:
                if key == "contents" or key == "tools":
                    model = types.Content if key == "contents" else types.Tool
                    for item in value:
                        model.model_validate(item)
                elif key in _BODY:
                    _BODY[key].model_validate(value)
            except (ValidationError, TypeError) as exc:
                return f"Invalid JSON payload received at '{key}': {exc}"
        contents = body.get("contents")
        if not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        calls = 0
        for i, c in enumerate(contents):
            if i and c.get("role") == contents[i - 1].get("role"):
                return "Please ensure that multiturn requests alternate between user and model."
            answers = sum(1 for p in c["parts"] if "functionResponse" in p)
            if answers and answers != calls:
                return ("Please ensure that the number of function response parts is equal to the number "
                        "of function call parts of the function call turn.")
            calls = sum(1 for p in c["parts"] if "functionCall" in p)
        for c in contents:  # as Gemini 3 does: the first call of each step must bring its signature back
            first = next((p for p in c["parts"] if "functionCall" in p), None)
            if first is not None and \
                    first.get("thoughtSignature") != signature(first["functionCall"]["name"]):
                return ("Function call is missing a thought_signature in functionCall parts. This is "
                        "required for tools to work correctly.")
        return None

    @staticmethod
    def _calls(body: dict[str, Any], opts: dict[str, Any]) -> list[dict[str, Any]]:
        """The calls to answer with: the first allowed tool, or every one (``tool_calls: all``)."""
        last = body["contents"][-1]["parts"]
        config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        if any("functionResponse" in p for p in last) or config.get("mode") == "NONE":
            return []
        declared = [d for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
        allowed = config.get("allowedFunctionNames")
        declared = [d for d in declared if not allowed or d["name"] in allowed]
        chosen = declared if opts.get("tool_calls") == "all" else declared[:1]
        calls: list[dict[str, Any]] = [{"functionCall": {
            "name": d["name"], "args": example_arguments(d.get("parametersJsonSchema"))}} for d in chosen]
        if calls:  # Gemini signs the first call of a step
            calls[0]["thoughtSignature"] = signature(calls[0]["functionCall"]["name"])
        return calls

    async def generate(self, request: Request, record: Any, opts: dict[str, Any], model: str,
                       stream: bool) -> Response:
        body: dict[str, Any] = record.body
        problem = self.check(body)
        if problem:
            return gemini_error(400, problem)
        contents = body["contents"]
        config = body.get("generationConfig") or {}
        last = contents[-1]["parts"]
        answered = [p["functionResponse"]["response"] for p in last if "functionResponse" in p]
        if answered:
            opts = {**opts, "reply": "The tool said " + " ".join(json.dumps(a) for a in answered)}
        calls = self._calls(body, opts)
        limit = config.get("maxOutputTokens")
        words, cut = ([], False) if calls else words_for(_texts(contents), opts, limit)
        prompt = count_words(_texts(contents) + " " + _texts([body.get("systemInstruction") or {}]))
        produced = len(words) + sum(len(json.dumps(c["functionCall"]["args"]).split()) for c in calls)
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": produced,
                 "totalTokenCount": prompt + produced}
        finish = "MAX_TOKENS" if cut else "STOP"
        rid = f"fake-{len(self.requests)}"

        def answer(parts: list[dict[str, Any]], finish_reason: str | None,
                   meta: dict[str, Any]) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if finish_reason:
                candidate["finishReason"] = finish_reason
            return {"candidates": [candidate], "usageMetadata": meta, "modelVersion": model,
                    "responseId": rid}

        if not stream:
            await self.pause(opts)
            parts = ([{"text": " ".join(words)}] if words else []) + calls
            return JSONResponse(answer(parts, finish, usage))
        if request.query_params.get("alt") != "sse":
            return gemini_error(400, "the fake streams SSE only (alt=sse)")
        pieces = [[{"text": w}] for w in spaced(words)] + [[c] for c in calls]
        frames = []
        for i, parts in enumerate(pieces):
            final = i == len(pieces) - 1
            meta = usage if final else {**usage, "candidatesTokenCount": i + 1,
                                        "totalTokenCount": prompt + i + 1}
            frames.append(self.frame(answer(parts, finish if final else None, meta)))
        return self.stream(record, frames, opts)

    @staticmethod
    def frame(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\r\n\r\n"

    async def embed(self, body: dict[str, Any], opts: dict[str, Any], model: str, batch: bool) -> Response:
        await self.pause(opts)
        requests = body.get("requests") if batch else [body]
        if not isinstance(requests, list) or not requests or len(requests) > 100:
            return gemini_error(400, "* BatchEmbedContentsRequest.requests: at most 100 requests are allowed")
        vectors = []
        for r in requests:
            if batch and r.get("model") != f"models/{model}":
                return gemini_error(400, f"Model names should match: {r.get('model')!r} vs models/{model}")
            unknown = set(r) - {"model", "content", "taskType", "title", "outputDimensionality"}
            if unknown:
                return gemini_error(400, f'Invalid JSON payload received. Unknown name "{unknown.pop()}"')
            types.Content.model_validate(r["content"])
            text = _texts([r["content"]])
            vectors.append({"values": vector(text, int(r.get("outputDimensionality") or opts["dimensions"]))})
        return JSONResponse({"embeddings": vectors} if batch else {"embedding": vectors[0]})

    async def list_models(self, request: Request) -> Response:
        await self.record(request)
        unauthorized = self._unauthorized(request)
        if unauthorized is not None:
            return unauthorized
        return JSONResponse({"models": [
            {"name": f"models/{m}", "version": "001", "displayName": m,
             "supportedGenerationMethods": ["embedContent"] if "embedding" in m else
             ["generateContent", "countTokens"]} for m in self.models]})
