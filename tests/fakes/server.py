"""What both fakes share: the uvicorn-in-a-thread runner, request recording, the per-request
options, the begin/pause/stream plumbing of a handler, and the deterministic content
(reply words, tool calls, embedding vectors)."""

from __future__ import annotations

import asyncio
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
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
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
    """A Starlette app run by its own uvicorn server in a daemon thread.

    A subclass gives its :meth:`routes`, its stream framing (:attr:`MEDIA_TYPE`,
    :meth:`frame`) and what :meth:`begin` answers when a request cannot be served
    (:meth:`refuse`, :meth:`injected_error`, :meth:`unknown_model`).
    """

    MEDIA_TYPE = "application/octet-stream"

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

    async def begin(self, request: Request) -> tuple[Recorded, dict[str, Any], Response | None]:
        """Record ``request`` and work out its options; third, the answer if it is not served.

        That answer is, first come first served: :meth:`refuse` (the body or the credentials),
        the ``error`` option (after ``latency_ms``, with ``Retry-After`` when ``retry_after`` is
        set), :meth:`unknown_model`.
        """
        record = await self.record(request)
        opts = self.options(record.body)
        failed = self.refuse(request, record.body)
        if failed is None and opts.get("error"):
            await self.pause(opts)
            status = int(opts["error"])
            after = opts.get("retry_after")
            failed = self.injected_error(status, {"retry-after": str(after)} if after is not None else None)
        if failed is None:
            failed = self.unknown_model(record.body)
        return record, opts, failed

    def refuse(self, request: Request, body: Any) -> Response | None:
        """The answer to a request not worth looking at (bad credentials, not a JSON object)."""
        raise NotImplementedError

    def injected_error(self, status: int, headers: dict[str, str] | None) -> Response:
        """The answer asked for by the ``error`` option."""
        raise NotImplementedError

    def unknown_model(self, body: dict[str, Any]) -> Response | None:
        """The answer when ``body`` names no model this fake serves."""
        raise NotImplementedError

    @staticmethod
    def frame(obj: Any) -> bytes:
        """``obj`` as one piece of a stream."""
        raise NotImplementedError

    @staticmethod
    async def pause(opts: dict[str, Any], key: str = "latency_ms") -> None:
        if opts.get(key):
            await asyncio.sleep(float(opts[key]) / 1000)

    def stream(self, record: Recorded, pieces: Sequence[bytes], opts: dict[str, Any],
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
        return StreamingResponse(body(), status_code=status, media_type=self.MEDIA_TYPE, headers=headers)


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


def chat_words(messages: Any, opts: dict[str, Any], limit: int | None) -> tuple[list[str], bool]:
    """:func:`words_for` a conversation; one that ends with a tool result gets that quoted."""
    quoted = tool_result_reply(messages)
    return words_for(message_text(messages), {**opts, "reply": quoted} if quoted else opts, limit)


def spaced(words: Sequence[str]) -> list[str]:
    """Stream pieces that concatenate to the words joined by spaces."""
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


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


def embedding_vectors(inputs: Sequence[Any], body: dict[str, Any], opts: dict[str, Any]) -> list[list[float]]:
    """One :func:`vector` per input, of the request's ``dimensions``, else the fake's."""
    dims = int(body.get("dimensions") or opts["dimensions"])
    return [vector(json.dumps(x), dims) for x in inputs]


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


def tool_call(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The function to call (:func:`first_tool`) and :func:`example_arguments` for it, if any."""
    tool = first_tool(body)
    return None if tool is None else (tool["name"], example_arguments(tool.get("parameters")))
