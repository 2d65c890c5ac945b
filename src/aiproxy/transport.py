"""The upstream client's transport: a lean HTTP/1.1 keep-alive pool on asyncio + httptools.

httpx's default transport (httpcore over anyio) spends most of a gateway's CPU in its
pool bookkeeping: every request walks every pooled connection asking anyio whether
it has expired. Here an idle connection knows it is dead the moment the event loop
tells it (``connection_lost``), so taking one from the pool is a ``list.pop``.

What it does: one pool per origin (scheme, host, port), most recently used first;
``max_connections`` open in all, at most ``max_keepalive`` idle, each idle for at most
``keepalive_expiry`` s (one timer per pool closes them, their origin called again or
not). Bodies stream both ways (``content-length`` or chunked); a response read to its
end puts its connection back, one closed early (a client that went away) closes it,
which cancels the request upstream. Timeouts are httpx's
(``request.extensions["timeout"]``: connect, read, write, pool) and failures are
httpx's exceptions, so ``httpx.AsyncClient`` and everything above it stay unchanged.
TLS through :mod:`ssl` for https. HTTP/1.1 only; no proxies (the client never uses
one); a HEAD answer is read as headers only.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

from aiproxy import httpx_lean

Origin = tuple[bytes, bytes, int]
_HIGH_WATER = 256 * 1024  # buffered body bytes before reading from the socket pauses
_DEFAULT_PORTS = {b"http": 80, b"https": 443}


def _refuse_line_breaks(headers: list[tuple[bytes, bytes]]) -> None:
    """A CR or LF in a header would let its value write further headers or a second
    request onto a shared connection (h11 refuses the same). The value may be a key:
    only the header's name is told."""
    for name, value in headers:
        if any(c in name or c in value for c in (b"\r", b"\n")):
            raise httpx.LocalProtocolError(f"header {name.decode('latin-1')!r} contains a line break")


class _Connection(asyncio.Protocol):
    """One upstream connection and the response being read on it (httptools callbacks)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[bool] | None = None
        self.write_paused = False
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.complete = False
        self.keep_alive = False
        self.until_eof = False  # neither content-length nor chunked: the body ends at EOF
        self.error: httpx.TransportError | None = None

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(httpx.RemoteProtocolError(f"malformed response from upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and self.until_eof and not self.complete and self.error is None:
            self.complete = True  # a body delimited by the end of the connection
            self.keep_alive = False
        elif not self.complete:
            what = "while sending the response" if self.headers_done else "without sending a response"
            self.fail(httpx.RemoteProtocolError(f"upstream closed the connection {what}"))
        self.wake(True)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake(True)

    # ------------------------------------------------------------ httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers.clear()
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)
        self.until_eof = not framed and self.status not in (204, 304) and self.status >= 200
        self.wake(True)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self.wake(True)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return  # the end of an interim answer
        self.complete = True
        self.wake(True)

    # ------------------------------------------------------------ waiting
    def fail(self, exc: httpx.TransportError) -> None:
        if self.error is None:
            self.error = exc
        self.wake(True)

    def wake(self, value: bool) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    async def wait(self, limit: float | None) -> bool:
        """Until something happens on the connection (True) or ``limit`` s pass (False)."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(limit, self.wake, False) if limit is not None else None
        try:
            return await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ one exchange
    async def write(self, data: bytes, limit: float | None) -> None:
        if self.closed or self.transport is None:
            raise self.error or httpx.WriteError("upstream connection is closed")
        self.transport.write(data)
        while self.write_paused and not self.closed:
            if not await self.wait(limit):
                raise httpx.WriteTimeout("timed out sending the request upstream")
        if self.error is not None and not self.headers_done:
            raise self.error

    async def read_head(self, limit: float | None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            if not await self.wait(limit):
                raise httpx.ReadTimeout("timed out waiting for the upstream's response")

    async def read_chunk(self, limit: float | None) -> bytes | None:
        """The body bytes received so far (None at the end of the body)."""
        while True:
            if self.chunks:
                data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                self.buffered = 0
                if self.reading_paused and self.transport is not None:
                    self.reading_paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            if not await self.wait(limit):
                raise httpx.ReadTimeout("timed out reading the upstream's response")


class Body(httpx.AsyncByteStream):
    """A response body; reading it to its end or closing it gives the connection back."""

    def __init__(self, pool: Transport, conn: _Connection, read_timeout: float | None) -> None:
        self.pool = pool
        self.conn: _Connection | None = conn
        self.read_timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if conn is None:
            raise httpx.StreamClosed()
        try:
            while True:
                chunk = await conn.read_chunk(self.read_timeout)
                if chunk is None:
                    break
                yield chunk
        except BaseException:
            self._done(reuse=False)
            raise
        self._done(reuse=True)

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        parts = [chunk async for chunk in self]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def aclose(self) -> None:
        self._done(reuse=True)

    def _done(self, *, reuse: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.release(conn, reuse=reuse and conn.complete)


class Transport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` over a pool of HTTP/1.1 keep-alive connections."""

    def __init__(self, *, max_connections: int = 1000, max_keepalive: int = 200,
                 keepalive_expiry: float = 60.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        # one timer for the whole pool closes idle connections as they expire, so an
        # origin nobody calls again does not keep its sockets open
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ httpx interface
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the upstream client is closed")
        timeouts: dict[str, float | None] = request.extensions.get("timeout") or {}
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme.decode()!r}")
        origin = (scheme, url.raw_host, url.port or _DEFAULT_PORTS[scheme])
        conn = await self._acquire(origin, timeouts)
        try:
            await self._exchange(conn, request, timeouts)
        except BaseException:  # cancelled included: a half-done exchange leaves the connection unusable
            self.release(conn, reuse=False)
            raise
        if request.method == "HEAD":
            conn.complete, conn.keep_alive = True, False
        stream = Body(self, conn, timeouts.get("read"))
        if httpx_lean.LEAN:
            return httpx_lean.response(conn.status, conn.headers, stream, {"http_version": b"HTTP/1.1"})
        return httpx.Response(conn.status, headers=conn.headers, stream=stream,
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._open -= self._idle_count
        self._idle.clear()
        self._idle_count = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------ the exchange
    async def _exchange(self, conn: _Connection, request: httpx.Request,
                        timeouts: dict[str, float | None]) -> None:
        conn.reset()
        url = request.url
        head = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        raw = request.headers.raw
        for name, value in raw:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        data = b"".join(head)
        if data.count(b"\n") != len(raw) + 2 or data.count(b"\r") != len(raw) + 2:
            _refuse_line_breaks(raw)
        write_timeout = timeouts.get("write")
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None
        if body is not None:
            await conn.write(data + body, write_timeout)
        else:
            await conn.write(data, write_timeout)
            chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
            async for part in request.stream:  # type: ignore[union-attr]
                if part:
                    await conn.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part, write_timeout)
            if chunked:
                await conn.write(b"0\r\n\r\n", write_timeout)
        await conn.read_head(timeouts.get("read"))

    # ------------------------------------------------------------ the pool
    async def _acquire(self, origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
        deadline: float | None = None
        while True:
            conn = self._take_idle(origin)
            if conn is not None:
                return conn
            if self._open < self.max_connections or self._evict_idle():
                self._open += 1
                try:
                    return await self._connect(origin, timeouts.get("connect"))
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            pool_timeout = timeouts.get("pool")
            now = time.monotonic()
            if deadline is None and pool_timeout is not None:
                deadline = now + pool_timeout
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:  # not asyncio.wait_for: on 3.11 it swallows a cancellation that comes with the wake-up
                async with asyncio.timeout(None if deadline is None else max(0.0, deadline - now)):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken but leaving: the free slot goes to the next in line
                if isinstance(exc, TimeoutError):
                    raise httpx.PoolTimeout("no upstream connection became free in time") from None
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            if self._closed:
                raise httpx.ConnectError("the upstream client is closed")

    def _take_idle(self, origin: Origin) -> _Connection | None:
        conns = self._idle.get(origin)
        if not conns:
            return None
        expired = time.monotonic() - self.keepalive_expiry
        while conns:
            conn = conns.pop()
            self._idle_count -= 1
            if not conn.closed and conn.idle_since >= expired:
                return conn
            conn.close()
            self._open -= 1
        return None

    def _evict_idle(self) -> bool:
        """Close the longest-idle connection of any origin to make room; False if none."""
        oldest: list[_Connection] | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest[0].idle_since):
                oldest = conns
        if oldest is None:
            return False
        oldest.pop(0).close()
        self._idle_count -= 1
        self._open -= 1
        return True

    def release(self, conn: _Connection, *, reuse: bool) -> None:
        """Back to the pool when it can carry another request, else closed."""
        if reuse and conn.keep_alive and not conn.closed and not self._closed \
                and self._idle_count < self.max_keepalive:
            conn.chunks.clear()  # body bytes nobody read: not kept while idle
            if conn.reading_paused and conn.transport is not None:
                conn.reading_paused = False  # else the next answer (or the upstream closing) goes unseen
                conn.transport.resume_reading()
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
            self._idle_count += 1
            if self._expiry is None or self._expiry_loop is not conn.loop:
                self._arm_expiry(conn.loop, self.keepalive_expiry)
        else:
            conn.close()
            self._open -= 1
        self._wake_one()

    def _arm_expiry(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()  # (one armed on an event loop no longer running this pool)
        self._expiry = loop.call_later(delay, self._close_expired)
        self._expiry_loop = loop

    def _close_expired(self) -> None:
        """The timer: close every idle connection past ``keepalive_expiry`` (or already
        closed by the upstream), then wait for the next one to expire, if any is left."""
        self._expiry = None
        if self._closed:
            return
        now = time.monotonic()
        expired = now - self.keepalive_expiry
        oldest: float | None = None
        closed = 0
        for origin, conns in list(self._idle.items()):
            while conns and (conns[0].closed or conns[0].idle_since <= expired):  # oldest first
                conns.pop(0).close()
                closed += 1
            if not conns:
                del self._idle[origin]  # an origin nobody calls does not stay in the pool
            elif oldest is None or conns[0].idle_since < oldest:
                oldest = conns[0].idle_since
        self._idle_count -= closed
        self._open -= closed
        if oldest is not None and self._expiry_loop is not None:
            self._arm_expiry(self._expiry_loop, oldest - expired)
        for _ in range(closed):
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: Origin, limit: float | None) -> _Connection:
        scheme, raw_host, port = origin
        host = raw_host.decode("ascii")
        loop = asyncio.get_running_loop()
        context = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            context = self._ssl
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, origin), host, port, ssl=context,
                    server_hostname=host if context is not None else None)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"could not connect to {host}:{port}: {exc}") from None
        return conn

