"""Fake upstreams served for real: uvicorn on 127.0.0.1, a free port, a background thread.

- :class:`FakeOpenAI` speaks the OpenAI wire format (``/v1/chat/completions``,
  ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``), JSON and SSE;
- :class:`FakeOllama` speaks Ollama's native API as documented in ollama's
  ``docs/api.md`` (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``),
  JSON and NDJSON, streaming by default as Ollama does.

Both answer deterministically (the same request gets the same words and counts), and
record every request (:class:`Recorded`: headers, JSON body, and for a stream whether
it completed or its client went away first). Behaviour comes from the fake's
``defaults``, overridden per request by a ``fake`` object in the body (the OpenAI
SDK's ``extra_body={"fake": {...}}``) or for a while by ``with fake.configured(...)``:

==================  ============================================================
``chunks``          words in a reply; a stream sends one word per chunk
``chunk_delay_ms``  wait between stream chunks (not before the first)
``latency_ms``      wait before the answer / the first chunk
``reply``           a fixed reply text instead of generated words
``error``           answer with this HTTP status instead (``retry_after`` seconds)
``dimensions``      embedding size, unless the request names one
==================  ============================================================

Usage::

    with FakeOpenAI() as upstream:                 # or FakeOpenAI(chunks=50) for a bench
        ... api_base = upstream.url + "/v1"
        record = upstream.wait_for(lambda r: r.disconnected, timeout=5)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()
DEFAULTS: dict[str, Any] = {"chunks": 6, "chunk_delay_ms": 0, "latency_ms": 0, "reply": None,
                            "error": None, "retry_after": None, "dimensions": 16}


@dataclass
class Recorded:
    """One request a fake received, and what became of its stream."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    client_port: int | None
    streamed: bool = False
    chunks_total: int = 0
    chunks_sent: int = 0
    completed: bool = False  # every chunk was produced
    disconnected: bool = False  # the client went away before that
    done: threading.Event = field(default_factory=threading.Event)

    def text(self) -> str:
        return json.dumps(self.body)


class FakeUpstream:
    """A Starlette app run by its own uvicorn server in a daemon thread."""

    def __init__(self, *, loop: str = "auto", **defaults: Any) -> None:
        self.defaults: dict[str, Any] = {**DEFAULTS, **defaults}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._loop = loop
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------ life cycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(Starlette(routes=self.routes()), log_config=None, log_level="warning",
                                access_log=False, lifespan="off", loop=self._loop,
                                timeout_graceful_shutdown=2, timeout_keep_alive=75, server_header=False)
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(server, sock),
                                        name=f"{type(self).__name__}:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__} did not start on port {self.port}")
            time.sleep(0.01)
        return self

    @staticmethod
    def _run(server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ for tests
    @contextlib.contextmanager
    def configured(self, **options: Any) -> Iterator[None]:
        """Change ``defaults`` for the duration of a ``with`` block."""
        saved = dict(self.defaults)
        self.defaults.update(options)
        try:
            yield
        finally:
            self.defaults.clear()
            self.defaults.update(saved)

    def matching(self, predicate: Callable[[Recorded], bool]) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]

    def with_text(self, marker: str) -> list[Recorded]:
        """Requests whose JSON body contains ``marker`` anywhere."""
        return self.matching(lambda r: marker in r.text())

    def wait_for(self, predicate: Callable[[Recorded], bool], timeout: float = 5.0) -> Recorded | None:
        """The first recorded request that satisfies ``predicate`` within ``timeout`` s, else None."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(predicate)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------ for handlers
    async def record(self, request: Request) -> Recorded:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = Recorded(method=request.method, path=request.url.path, headers=dict(request.headers),
                          body=body, client_port=request.client.port if request.client else None)
        with self._lock:
            self.requests.append(record)
        return record

    def options(self, body: Any) -> dict[str, Any]:
        opts = dict(self.defaults)
        extra = body.get("fake") if isinstance(body, dict) else None
        if isinstance(extra, dict):
            opts.update(extra)
        return opts

    @staticmethod
    async def pause(opts: dict[str, Any], key: str = "latency_ms") -> None:
        if opts.get(key):
            await asyncio.sleep(float(opts[key]) / 1000)

    @staticmethod
    def stream(record: Recorded, pieces: Sequence[bytes], opts: dict[str, Any], media_type: str,
               status: int = 200) -> StreamingResponse:
        """Send ``pieces`` one by one, ``chunk_delay_ms`` apart, noting a client that leaves."""
        delay = float(opts.get("chunk_delay_ms") or 0) / 1000
        record.streamed = True
        record.chunks_total = len(pieces)

        async def body() -> AsyncIterator[bytes]:
            try:
                await FakeUpstream.pause(opts)
                for i, piece in enumerate(pieces):
                    if i and delay:
                        await asyncio.sleep(delay)
                    if i == len(pieces) - 1:
                        record.completed = True
                    yield piece
                    record.chunks_sent = i + 1
            except BaseException:  # cancelled (the client went away) or closed early
                if not record.completed:
                    record.disconnected = True
                raise
            finally:
                record.done.set()

        headers = {"cache-control": "no-cache"}
        return StreamingResponse(body(), status_code=status, media_type=media_type, headers=headers)


# ---------------------------------------------------------------- shared content
def words_for(seed: str, opts: dict[str, Any], limit: int | None = None) -> tuple[list[str], bool]:
    """The deterministic reply words for ``seed``, and whether ``limit`` cut them short."""
    if opts.get("reply") is not None:
        words = str(opts["reply"]).split(" ")
    else:
        count = max(1, int(opts.get("chunks") or 1))
        start = zlib.crc32(seed.encode())
        words = [WORDS[(start + i * 7) % len(WORDS)] for i in range(count)]
    if limit is not None and limit < len(words):
        return words[:limit], True
    return words, False


def count_words(text: str) -> int:
    return len(text.split())


def message_text(messages: Any) -> str:
    parts: list[str] = []
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return " ".join(parts)


def vector(seed: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``seed``."""
    out: list[float] = []
    block = 0
    while len(out) < dims:
        digest = hashlib.sha256(f"{seed}:{block}".encode()).digest()
        out.extend(v / 32768.0 for v in struct.unpack("<16h", digest))
        block += 1
    out = out[:dims]
    norm = sum(v * v for v in out) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in out]


def example_arguments(schema: Any) -> dict[str, Any]:
    """Arguments that fit a JSON Schema object: first enum value, else a sample per type."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    out: dict[str, Any] = {}
    for name, spec in (props or {}).items():
        if not isinstance(spec, dict):
            continue
        kind = spec.get("type")
        if spec.get("enum"):
            out[name] = spec["enum"][0]
        elif kind == "object":
            out[name] = example_arguments(spec)
        else:
            out[name] = {"integer": 3, "number": 1.5, "boolean": True, "array": []}.get(
                str(kind), f"fake-{name}")
    return out


def tool_result_reply(messages: Any) -> str | None:
    """When the last message is a tool result, the answer that quotes it."""
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "tool":
        return f"The tool said {messages[-1].get('content')}"
    return None


def first_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool to call: the one ``tool_choice`` names, else the first; None when none applies."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or body.get("tool_choice") == "none":
        return None
    if tool_result_reply(body.get("messages")) is not None:
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for tool in tools:
            if (tool.get("function") or {}).get("name") == name:
                return tool["function"]
    fn = tools[0].get("function") if isinstance(tools[0], dict) else None
    return fn if isinstance(fn, dict) else None


# ---------------------------------------------------------------- OpenAI
class FakeOpenAI(FakeUpstream):
    """An OpenAI-compatible upstream. ``models``: ids it serves and lists; others get 404."""

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

    async def _begin(self, request: Request) -> tuple[Recorded, dict[str, Any], Response | None]:
        record = await self.record(request)
        body = record.body
        opts = self.options(body)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return record, opts, self.error(401, "Incorrect API key provided.", code="invalid_api_key")
        if not isinstance(body, dict):
            return record, opts, self.error(400, "We could not parse the JSON body of your request.")
        if opts.get("error"):
            await self.pause(opts)
            status = int(opts["error"])
            after = opts.get("retry_after")
            headers = {"retry-after": str(after)} if after is not None else None
            kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else \
                "invalid_request_error"
            return record, opts, self.error(status, f"fake upstream error {status}", type=kind,
                                            headers=headers)
        model = body.get("model")
        if model not in self.models:
            return record, opts, self.error(
                404, f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found")
        return record, opts, None

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _sse(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    # ------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        record, opts, failed = await self._begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        messages = body.get("messages") or []
        prompt_tokens = count_words(message_text(messages))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        tool = first_tool(body)
        cid = f"chatcmpl-fake{len(self.requests)}"
        created = int(time.time())
        model = body["model"]
        tool_calls: list[dict[str, Any]] = []
        if tool is not None:
            arguments = json.dumps(example_arguments(tool.get("parameters")))
            tool_calls = [{"id": f"call_fake{len(self.requests)}", "type": "function",
                           "function": {"name": tool["name"], "arguments": arguments}}]
            text, finish, completion_tokens = None, "tool_calls", count_words(arguments)
        else:
            quoted = tool_result_reply(messages)
            words, cut = words_for(message_text(messages), {**opts, "reply": quoted} if quoted else opts,
                                   int(limit) if isinstance(limit, int) else None)
            text, finish, completion_tokens = " ".join(words), "length" if cut else "stop", len(words)
        usage = self._usage(prompt_tokens, completion_tokens)

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
            return self._sse({"id": cid, "object": "chat.completion.chunk", "created": created,
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
            for i, word in enumerate(text.split(" ")):
                pieces.append(chunk({"content": word if i == 0 else " " + word}))
        pieces.append(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            pieces.append(self._sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                     "model": model, "system_fingerprint": "fp_fake", "choices": [],
                                     "usage": usage}))
        pieces.append(b"data: [DONE]\n\n")
        return self.stream(record, pieces, opts, "text/event-stream")

    # ------------------------------------------------------------ completions
    async def completions(self, request: Request) -> Response:
        record, opts, failed = await self._begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        prompt = body.get("prompt")
        prompt_text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
        limit = body.get("max_tokens")
        words, cut = words_for(prompt_text, opts, int(limit) if isinstance(limit, int) else None)
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
        pieces = [self._sse(completion(w if i == 0 else " " + w, None)) for i, w in enumerate(words)]
        pieces.append(self._sse(completion("", finish)))
        if (body.get("stream_options") or {}).get("include_usage"):
            pieces.append(self._sse({**completion("", None), "choices": [], "usage": usage}))
        pieces.append(b"data: [DONE]\n\n")
        return self.stream(record, pieces, opts, "text/event-stream")

    # ------------------------------------------------------------ embeddings
    async def embeddings(self, request: Request) -> Response:
        record, opts, failed = await self._begin(request)
        if failed is not None:
            return failed
        await self.pause(opts)
        body: dict[str, Any] = record.body
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw or [])
        dims = int(body.get("dimensions") or opts["dimensions"])
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            v = vector(json.dumps(item), dims)
            encoded: Any = base64.b64encode(struct.pack(f"<{dims}f", *v)).decode() if as_b64 else v
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = sum(count_words(x) if isinstance(x, str) else len(x) for x in inputs)
        return JSONResponse({"object": "list", "data": data, "model": body["model"],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def list_models(self, request: Request) -> Response:
        await self.record(request)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "Incorrect API key provided.", code="invalid_api_key")
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in self.models]})


# ---------------------------------------------------------------- Ollama
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ollama_name(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


class FakeOllama(FakeUpstream):
    """Ollama's native API. ``models``: installed models (``name:tag``); others get 404."""

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

    async def _begin(self, request: Request) -> tuple[Recorded, dict[str, Any], Response | None]:
        record = await self.record(request)
        body = record.body
        opts = self.options(body)
        if not isinstance(body, dict):
            return record, opts, self.error(400, "invalid character looking for beginning of value")
        if opts.get("error"):
            await self.pause(opts)
            status = int(opts["error"])
            after = opts.get("retry_after")
            headers = {"retry-after": str(after)} if after is not None else None
            return record, opts, self.error(status, f"fake ollama error {status}", headers)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return record, opts, self.error(400, "model is required")
        if _ollama_name(model) not in self.models:
            return record, opts, self.error(404, f"model '{model}' not found")
        return record, opts, None

    @staticmethod
    def _stats(prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
        return {"total_duration": 5_000_000 + eval_tokens * 1_000_000, "load_duration": 1_000_000,
                "prompt_eval_count": prompt_tokens, "prompt_eval_duration": 2_000_000,
                "eval_count": eval_tokens, "eval_duration": eval_tokens * 1_000_000}

    @staticmethod
    def _line(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def _num_predict(body: dict[str, Any]) -> int | None:
        value = (body.get("options") or {}).get("num_predict")
        return value if isinstance(value, int) and value >= 0 else None

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

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.9.0"})

    # ------------------------------------------------------------ chat
    async def chat(self, request: Request) -> Response:
        record, opts, failed = await self._begin(request)
        if failed is not None:
            return failed
        body: dict[str, Any] = record.body
        messages = body.get("messages")
        problem = self._check_messages(messages)
        if problem:
            return self.error(400, problem)
        model = body["model"]
        prompt_tokens = count_words(message_text(messages))
        tool = first_tool(body)
        tool_calls: list[dict[str, Any]] = []
        if tool is not None:
            arguments = example_arguments(tool.get("parameters"))
            tool_calls = [{"function": {"name": tool["name"], "arguments": arguments}}]
            words, reason, eval_count = [], "stop", count_words(json.dumps(arguments))
        else:
            quoted = tool_result_reply(messages)
            words, cut = words_for(message_text(messages), {**opts, "reply": quoted} if quoted else opts,
                                   self._num_predict(body))
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
            pieces.append(self._line({"model": model, "created_at": _now(), "message": {
                "role": "assistant", "content": "", "tool_calls": tool_calls}, "done": False}))
        for i, word in enumerate(words):
            pieces.append(self._line({"model": model, "created_at": _now(), "message": {
                "role": "assistant", "content": word if i == 0 else " " + word}, "done": False}))
        pieces.append(self._line({"model": model, "created_at": _now(),
                                  "message": {"role": "assistant", "content": ""},
                                  "done_reason": reason, "done": True, **stats}))
        return self.stream(record, pieces, opts, "application/x-ndjson")

    # ------------------------------------------------------------ generate
    async def generate(self, request: Request) -> Response:
        record, opts, failed = await self._begin(request)
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
        pieces = [self._line({"model": model, "created_at": _now(),
                              "response": w if i == 0 else " " + w, "done": False})
                  for i, w in enumerate(words)]
        pieces.append(self._line({"model": model, "created_at": _now(), "response": "", "done": True,
                                  "done_reason": reason, "context": [1, 2, 3], **stats}))
        return self.stream(record, pieces, opts, "application/x-ndjson")

    # ------------------------------------------------------------ embed and tags
    async def embed(self, request: Request) -> Response:
        record, opts, failed = await self._begin(request)
        if failed is not None:
            return failed
        await self.pause(opts)
        body: dict[str, Any] = record.body
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            return self.error(400, "invalid input type")
        dims = int(body.get("dimensions") or opts["dimensions"])
        return JSONResponse({"model": body["model"],
                             "embeddings": [vector(json.dumps(x), dims) for x in inputs],
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
