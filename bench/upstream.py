"""A fast fake OpenAI-compatible upstream for the benchmark: raw asyncio + httptools.

It must never be the bottleneck, so it does almost nothing per request: every answer
is encoded once at start-up, the request body is not parsed (``"stream": true`` is
found by a byte search), and HTTP/1.1 keep-alive is served straight off the protocol.

    python bench/upstream.py --port 9100 [--latency-ms 0] [--tokens 16] [--chunk-delay-ms 0]

``POST /v1/chat/completions`` answers JSON, or SSE when the body asks for a stream
(one chunk per token, then a usage chunk, then ``[DONE]``); ``GET /v1/models`` lists
the one model; anything else is 404. ``GET /health`` is 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
from typing import Any

import httptools

_STREAM = re.compile(rb'"stream"\s*:\s*true')
MODEL = "bench-model"


def _response(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    head = (f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            "connection: keep-alive\r\n\r\n")
    return head.encode() + body


def _answers(tokens: int) -> tuple[bytes, list[bytes], bytes, bytes]:
    words = ["tok"] * tokens
    whole = json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens},
    }, separators=(",", ":")).encode()
    chunks: list[bytes] = []
    base: dict[str, Any] = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
                            "created": 1700000000, "model": MODEL}
    for i, w in enumerate(words):
        delta = {"role": "assistant", "content": w} if i == 0 else {"content": " " + w}
        chunks.append(json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                                 separators=(",", ":")).encode())
    chunks.append(json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                             separators=(",", ":")).encode())
    chunks.append(json.dumps({**base, "choices": [], "usage": {
        "prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}},
        separators=(",", ":")).encode())
    frames = [_chunk(b"data: " + c + b"\n\n") for c in chunks] + [_chunk(b"data: [DONE]\n\n")]
    stream_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                   b"transfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n")
    models = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                     "owned_by": "bench"}]}).encode()
    return _response("200 OK", whole), frames, stream_head, _response("200 OK", models)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Upstream(asyncio.Protocol):
    """One connection: parse requests with httptools, answer from the pre-encoded bytes."""

    whole: bytes
    frames: list[bytes]
    stream_head: bytes
    models: bytes
    latency = 0.0
    chunk_delay = 0.0
    not_found = _response("404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error",'
                                           b'"param":null,"code":"not_found"}}')
    health = _response("200 OK", b'{"status":"ok"}')

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()
        self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            stream = _STREAM.search(b"".join(self.body)) is not None
            if self.latency or (stream and self.chunk_delay):
                self._spawn(self._slow(stream))
            elif stream:
                self._write(self.stream_head + b"".join(self.frames) + b"0\r\n\r\n")
            else:
                self._write(self.whole)
        elif method == b"GET" and path.endswith(b"/models"):
            self._write(self.models)
        elif method == b"GET" and path == b"/health":
            self._write(self.health)
        else:
            self._write(self.not_found)

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _slow(self, stream: bool) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)
        if not stream:
            self._write(self.whole)
            return
        self._write(self.stream_head)
        for i, frame in enumerate(self.frames):
            if i and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            self._write(frame)
        self._write(b"0\r\n\r\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="wait before answering")
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens (stream chunks)")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="wait between stream chunks")
    args = parser.parse_args()
    Upstream.whole, Upstream.frames, Upstream.stream_head, Upstream.models = _answers(args.tokens)
    Upstream.latency = args.latency_ms / 1000
    Upstream.chunk_delay = args.chunk_delay_ms / 1000
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, args.host, args.port, backlog=4096, reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"bench upstream on http://{args.host}:{args.port}", flush=True)
        async with server:
            await stop.wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
