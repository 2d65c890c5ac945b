"""Server-sent events as OpenAI frames them: ``data: <json>\\n\\n``, then ``data: [DONE]``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(body: dict[str, Any]) -> bytes:
    """The last event of a stream that failed after its first byte."""
    return event(body)


async def data_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Split an upstream SSE byte stream into the payloads of its ``data:`` fields.

    Yields each event's data (lines joined by ``\\n``) as bytes, without re-encoding;
    comments, ``event:``/``id:``/``retry:`` fields and empty events are dropped.
    Handles ``\\n``, ``\\r\\n`` and ``\\r`` line ends and events split across chunks.
    """
    buffer = b""
    after_cr = False  # the last chunk ended in \r: a \n opening this one ends the same line
    async for chunk in chunks:
        if after_cr and chunk.startswith(b"\n"):
            chunk, after_cr = chunk[1:], False
        if not chunk:
            continue
        after_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = buffer + chunk if buffer else chunk
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            block, buffer = buffer[:end], buffer[end + 2:]
            data = _data_of(block)
            if data is not None:
                yield data
    if buffer.strip():
        data = _data_of(buffer.strip(b"\n"))
        if data is not None:
            yield data


def payloads(events: bytes) -> list[bytes]:
    """The data of each whole event in ``events``, as :func:`data_events` reads them: for
    the gateway's own events (a provider yields whole ones), without its buffering."""
    if events.startswith(b"data: ") and events.find(b"\n", 6) == len(events) - 2 and events.endswith(b"\n\n"):
        return [events[6:-2]]  # the usual case: one event, one data line
    if b"\r" in events:
        events = events.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    out = []
    for block in events.split(b"\n\n"):
        data = _data_of(block.strip(b"\n")) if block.strip() else None
        if data is not None:
            out.append(data)
    return out


def _data_of(block: bytes) -> bytes | None:
    """The data of one event; None when it has none, or only blanks (a keep-alive)."""
    if block.startswith(b"data: ") and b"\n" not in block:  # the usual case: one data line
        data = block[6:]
    else:
        parts = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                parts.append(value[1:] if value.startswith(b" ") else value)
        data = b"\n".join(parts)
    return data if data.strip() else None


async def ndjson_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Split a newline-delimited JSON byte stream into its non-empty lines."""
    buffer = b""
    async for chunk in chunks:
        buffer = buffer + chunk if buffer else chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end].strip(), buffer[end + 1:]
            if line:
                yield line
    if buffer.strip():
        yield buffer.strip()


class EventStream(Response):
    """A ``text/event-stream`` answer relayed event by event.

    Starlette's StreamingResponse runs each stream in an anyio task group with a
    disconnect listener (about a quarter of a short stream's CPU here). This sends the
    same bytes with one plain watcher task: when the client goes away it cancels the
    relay, whose ``finally`` closes the upstream stream, so nothing keeps generating
    (and billing) tokens nobody reads. uvicorn drops writes to a gone client silently,
    so the watcher is what notices.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # a broken channel is the server's to report
                return
            gone = True
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            # Take the first event before the head goes out: once the relay has started, its
            # own cleanup (closing the upstream, the after-call stages) runs however this
            # ends, a failed or cancelled send of the head included. The gateway already
            # holds that event, so this costs no wait.
            chunk = await anext(self.events, None)
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            while chunk is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await anext(self.events, None)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone or task.uncancel():
                raise  # cancelled by someone else (shutdown): let it through
        finally:
            watcher.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
