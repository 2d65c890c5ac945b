"""aiproxy.transport.Transport (and the UpstreamClient over it) against a real local server.

The server is a few lines of asyncio so each test can make it misbehave exactly as it
needs: close a connection, hold a body back, never answer, answer garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from aiproxy.transport import Transport
from aiproxy.upstream import build_client, transport_error
from aiproxy.upstream_client import UpstreamClient


class Server:
    """HTTP/1.1 over asyncio streams; the path says how to answer."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0  # connections that ended (either side closed)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.release = asyncio.Event()  # lets /held send the rest of its body
        self.port = 0
        self._server: asyncio.Server | None = None
        self._ended = asyncio.Event()

    async def __aenter__(self) -> Server:
        if self._server is None:  # (the https test starts its own)
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.release.set()
        await self._server.wait_closed()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_closed(self, count: int) -> None:
        async with asyncio.timeout(2):
            while self.closed < count:
                self._ended.clear()
                await self._ended.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                line, *rest = head.decode().split("\r\n")
                method, path, _ = line.split(" ")
                headers = dict(h.split(": ", 1) for h in rest if h)
                headers = {k.lower(): v for k, v in headers.items()}
                body = await self._body(reader, headers)
                self.requests.append((path, headers, body))
                if not await self._answer(method, path, body, reader, writer):
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()
            self.closed += 1
            self._ended.set()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                if not size:
                    return b"".join(parts)
                parts.append(data[:-2])
        return b""

    async def _held(self, reader: asyncio.StreamReader) -> bool:
        """Until the test releases the body (True) or the client goes away (False)."""
        left = asyncio.ensure_future(reader.read(1))
        released = asyncio.ensure_future(self.release.wait())
        done, pending = await asyncio.wait({left, released}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return released in done

    async def _answer(self, method: str, path: str, body: bytes, reader: asyncio.StreamReader,
                      w: asyncio.StreamWriter) -> bool:
        """Write the answer; False to end the connection."""
        path = path.split("?", 1)[0]
        if path == "/json":
            w.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n'
                    b'{"ok":true}')
        elif path == "/echo":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        elif path == "/close":
            w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
            await w.drain()
            return False
        elif path == "/then-close":  # keep-alive promised, then the server drops it anyway
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await w.drain()
            return False
        elif path == "/eof":  # no framing: the body ends with the connection
            w.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            await w.drain()
            return False
        elif path == "/drop":
            return False
        elif path == "/hang":
            self.release.clear()
            return await self._held(reader) and False
        elif path == "/garbage":
            w.write(b"SPDY/9 what\r\n\r\n")
        elif path in ("/held", "/chunked"):
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n")
            await w.drain()
            if path == "/held" and not await self._held(reader):
                return False
            w.write(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        elif path == "/interim":  # an unasked-for 103 before the answer
            w.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal")
        elif path == "/status/503":
            w.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
        await w.drain()
        return True


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as s:
        yield s


@contextlib.asynccontextmanager
async def client(**limits: Any) -> AsyncIterator[httpx.AsyncClient]:
    if limits:
        http: httpx.AsyncClient = UpstreamClient(transport=Transport(**limits), timeout=5.0)
    else:
        http = build_client()
    async with http:
        yield http


async def test_keep_alive_reuses_one_connection(server: Server) -> None:
    async with client() as http:
        for _ in range(3):
            r = await http.post(server.url("/json"), content=b"{}")
            assert r.status_code == 200 and r.json() == {"ok": True}
        assert server.connections == 1


async def test_request_headers_and_body_arrive_intact(server: Server) -> None:
    async with client() as http:
        r = await http.post(server.url("/echo?x=1"), content=b'{"a":1}', headers={"x-Custom": "v"})
    assert r.content == b'{"a":1}'
    path, headers, _ = server.requests[0]
    assert path == "/echo?x=1"
    assert headers["x-custom"] == "v" and headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["content-length"] == "7"


async def test_chunked_stream_arrives_piece_by_piece(server: Server) -> None:
    async with client() as http:
        async with http.stream("GET", server.url("/held")) as r:
            assert r.headers["content-type"] == "text/event-stream"
            chunks = r.aiter_bytes()
            assert await anext(chunks) == b"data: 1\n"  # before the server sends the rest
            server.release.set()
            assert b"".join([c async for c in chunks]) == b"data: 2\n"
        r = await http.get(server.url("/json"))  # the finished stream's connection is reused
        assert r.status_code == 200
    assert server.connections == 1


async def test_connection_close_is_honoured(server: Server) -> None:
    async with client() as http:
        assert (await http.get(server.url("/close"))).text == "ok"
        assert (await http.get(server.url("/json"))).status_code == 200
    assert server.connections == 2


async def test_a_connection_the_server_dropped_while_idle_is_not_reused(server: Server) -> None:
    async with client() as http:
        assert (await http.get(server.url("/then-close"))).text == "ok"
        await server.wait_closed(1)
        await asyncio.sleep(0.01)  # the event loop delivers the EOF to the idle connection
        assert (await http.get(server.url("/json"))).status_code == 200
    assert server.connections == 2


async def test_body_delimited_by_the_end_of_the_connection(server: Server) -> None:
    async with client() as http:
        r = await http.get(server.url("/eof"))
    assert r.text == "until the end"


async def test_no_answer_is_a_remote_protocol_error_and_maps_to_502(server: Server) -> None:
    async with client() as http:
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            await http.get(server.url("/drop"))
    assert transport_error("up", caught.value).status == 502


async def test_malformed_answer_is_a_remote_protocol_error(server: Server) -> None:
    async with client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(server.url("/garbage"))
        assert (await http.get(server.url("/json"))).status_code == 200  # a new connection works


async def test_error_status_is_an_ordinary_response(server: Server) -> None:
    async with client() as http:
        r = await http.get(server.url("/status/503"))
    assert (r.status_code, r.text) == (503, "busy")


async def test_read_timeout_closes_the_connection(server: Server) -> None:
    async with client() as http:
        with pytest.raises(httpx.ReadTimeout) as caught:
            await http.get(server.url("/hang"), timeout=httpx.Timeout(5.0, read=0.02))
        await server.wait_closed(1)
    assert transport_error("up", caught.value).status == 504


async def test_read_timeout_between_chunks(server: Server) -> None:
    async with client() as http:
        async with http.stream("GET", server.url("/held"), timeout=httpx.Timeout(5.0, read=0.02)) as r:
            chunks = r.aiter_bytes()
            assert await anext(chunks) == b"data: 1\n"
            with pytest.raises(httpx.ReadTimeout):
                await anext(chunks)
        await server.wait_closed(1)


async def test_connect_error() -> None:
    async with Server() as gone:
        port = gone.port
    async with client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get(f"http://127.0.0.1:{port}/json")
    assert transport_error("up", caught.value).status == 502


async def test_pool_timeout_when_every_connection_is_busy(server: Server) -> None:
    transport = Transport(max_connections=1)
    async with UpstreamClient(transport=transport, timeout=httpx.Timeout(5.0, pool=0.02)) as http:
        async with http.stream("GET", server.url("/held")) as r:
            chunks = r.aiter_bytes()  # held: a dropped iterator would end the stream
            await anext(chunks)
            with pytest.raises(httpx.PoolTimeout) as caught:
                await http.get(server.url("/json"))
            assert transport_error("up", caught.value).status == 503
            server.release.set()
        assert (await http.get(server.url("/json"))).status_code == 200  # the slot came back


async def test_a_waiting_request_gets_the_connection_that_frees_up(server: Server) -> None:
    async with client(max_connections=1) as http:
        async with http.stream("GET", server.url("/held")) as r:
            chunks = r.aiter_bytes()
            await anext(chunks)
            waiting = asyncio.create_task(http.get(server.url("/json")))
            await asyncio.sleep(0.005)
            assert not waiting.done()
            server.release.set()
            assert b"".join([c async for c in chunks]) == b"data: 2\n"
        assert (await waiting).json() == {"ok": True}
    assert server.connections == 1


async def test_closing_a_stream_mid_body_closes_its_connection(server: Server) -> None:
    transport = Transport()
    async with UpstreamClient(transport=transport, timeout=5.0) as http:
        async with http.stream("GET", server.url("/held")) as r:
            chunks = r.aiter_bytes()
            await anext(chunks)
        await server.wait_closed(1)  # the server sees the client leave: the upstream call is cancelled
        assert transport._open == 0
        assert (await http.get(server.url("/json"))).status_code == 200


async def test_cancelling_a_request_waiting_for_its_answer_closes_the_connection(server: Server) -> None:
    transport = Transport(max_connections=1)
    async with UpstreamClient(transport=transport, timeout=5.0) as http:
        task = asyncio.create_task(http.get(server.url("/hang")))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.wait_closed(1)
        assert (await http.get(server.url("/json"))).status_code == 200  # its slot was given back


async def test_concurrent_requests_each_get_their_own_answer(server: Server) -> None:
    transport = Transport(max_connections=8)
    async with UpstreamClient(transport=transport, timeout=5.0) as http:
        bodies = [b'{"n":%d}' % i for i in range(40)]
        answers = await asyncio.gather(*(http.post(server.url("/echo"), content=b) for b in bodies))
        assert [a.content for a in answers] == bodies
        assert server.connections <= 8
        assert transport._open == server.connections - server.closed


async def test_large_bodies_both_ways(server: Server) -> None:
    big = bytes(range(256)) * 20_000  # 5 MB
    async with client() as http:
        r = await http.post(server.url("/echo"), content=big)
        assert r.content == big

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 1 << 20):
                yield big[i:i + (1 << 20)]

        r = await http.post(server.url("/echo"), content=pieces())  # chunked request body
        assert r.content == big
        assert server.requests[-1][1]["transfer-encoding"] == "chunked"


async def test_closed_client_refuses_requests(server: Server) -> None:
    http = build_client()
    await http.aclose()
    with pytest.raises(RuntimeError):
        await http.get(server.url("/json"))


async def test_upstream_client_takes_httpx_path_for_what_it_does_not_shortcut(server: Server) -> None:
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(str(request.url))

    async with UpstreamClient(transport=Transport(), timeout=5.0, event_hooks={"request": [hook]}) as http:
        r = await http.post(server.url("/echo"), params={"a": "b"}, json={"k": 1})
    assert r.content == b'{"k":1}'
    assert seen == [server.url("/echo?a=b")]


async def test_timeout_given_to_build_request_reaches_the_transport() -> None:
    got: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        got.append(request.extensions["timeout"])
        return httpx.Response(200, json={})

    async with build_client(httpx.MockTransport(handler)) as http:
        request = http.build_request("POST", "http://up/v1/x", content=b"{}", headers={"a": "1"},
                                     timeout=httpx.Timeout(3.0, read=7.0))
        assert request.headers["a"] == "1" and "user-agent" in request.headers
        await http.send(request)
    assert got == [{"connect": 3.0, "read": 7.0, "write": 3.0, "pool": 3.0}]


async def test_requests_sharing_a_timeout_each_get_their_own_extensions() -> None:
    async with build_client(httpx.MockTransport(lambda r: httpx.Response(200))) as http:
        limits = httpx.Timeout(3.0, read=7.0)
        first = http.build_request("POST", "http://up/v1/x", content=b"{}", timeout=limits)
        first.extensions["aiproxy.credential"] = "sk-first"  # what a provider adds to one request
        second = http.build_request("POST", "http://up/v1/x", content=b"{}", timeout=limits)
        assert second.extensions == {"timeout": {"connect": 3.0, "read": 7.0, "write": 3.0, "pool": 3.0}}
        assert http.build_request("GET", "http://up/v1/x", timeout=2.0).extensions["timeout"]["read"] == 2.0
        http.timeout = httpx.Timeout(4.0)  # a new client default is the one used from then on
        assert http.build_request("GET", "http://up/v1/x").extensions["timeout"]["read"] == 4.0
        http.timeout = httpx.Timeout(None)
        assert http.build_request("GET", "http://up/v1/x").extensions["timeout"]["read"] is None


def _self_signed(tmp: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_https_verifies_the_server_and_reuses_the_connection(tmp_path: Any) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    s = Server()
    s._server = await asyncio.start_server(s._handle, "127.0.0.1", 0, ssl=server_ctx)
    s.port = s._server.sockets[0].getsockname()[1]
    async with s:
        url = f"https://127.0.0.1:{s.port}/json"
        async with client() as http:  # the system's CAs: our certificate is refused
            with pytest.raises(httpx.ConnectError):
                await http.get(url)
        trusting = ssl.create_default_context(cafile=cert)
        async with UpstreamClient(transport=Transport(ssl_context=trusting), timeout=5.0) as http:
            for _ in range(2):
                assert (await http.get(url)).json() == {"ok": True}
        assert s.connections == 1  # both calls on one connection (the refused handshake never got here)


async def test_an_interim_answer_is_skipped_and_does_not_shift_later_answers(server: Server) -> None:
    async with client() as http:
        r = await http.get(server.url("/interim"))
        assert (r.status_code, r.text) == (200, "final")
        assert "link" not in r.headers
        r = await http.get(server.url("/json"))  # the same connection: its own answer, not a leftover
        assert r.json() == {"ok": True}
    assert server.connections == 1


async def test_a_line_break_in_a_header_is_refused_without_showing_its_value(server: Server) -> None:
    async with client() as http:
        with pytest.raises(httpx.LocalProtocolError) as caught:
            await http.post(server.url("/json"), content=b"{}",
                            headers={"authorization": "Bearer sk-tenant\r\nx-injected: 1"})
        assert "authorization" in str(caught.value) and "sk-tenant" not in str(caught.value)
        assert (await http.get(server.url("/json"))).status_code == 200
    assert [path for path, _, _ in server.requests] == ["/json"]  # the bad one never left


async def test_an_unread_body_with_reading_paused_leaves_a_usable_connection(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("aiproxy.transport._HIGH_WATER", 1)  # any body pauses reading
    async with client() as http:
        async with http.stream("GET", server.url("/json")) as r:
            conn = r.stream.conn  # type: ignore[attr-defined]
            for _ in range(100):
                if conn.complete:
                    break
                await asyncio.sleep(0.001)
            assert conn.complete and conn.reading_paused  # closed unread, whole and paused
        r = await http.get(server.url("/json"), timeout=httpx.Timeout(5.0, read=1.0))
        assert r.json() == {"ok": True}
    assert server.connections == 1


async def test_a_request_cancelled_as_it_is_woken_for_a_free_connection_stays_cancelled(
        server: Server) -> None:
    async with UpstreamClient(transport=Transport(max_connections=1), timeout=5.0) as http:
        async with http.stream("GET", server.url("/json")):
            first = asyncio.create_task(http.get(server.url("/json")))
            second = asyncio.create_task(http.get(server.url("/json")))
            await asyncio.sleep(0.005)
            assert not first.done() and not second.done()
        first.cancel()  # the connection was just freed and handed to it
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await second).json() == {"ok": True}  # and passed on
    assert [path for path, _, _ in server.requests] == ["/json", "/json"]


async def test_idle_connections_expire_even_when_their_origin_is_not_called_again(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]  # the pool's clock; the event loop's timer still runs in real time
    monkeypatch.setattr("aiproxy.transport.time", SimpleNamespace(monotonic=lambda: now[0]))
    transport = Transport(keepalive_expiry=0.05)
    async with Server() as other, UpstreamClient(transport=transport, timeout=5.0) as http:
        assert (await http.get(server.url("/json"))).status_code == 200  # idle from 1000.0: timer armed
        now[0] = 1000.04
        assert (await http.get(other.url("/json"))).status_code == 200  # idle from 1000.04
        now[0] = 1000.05
        await server.wait_closed(1)  # the timer closed the expired one, nobody called its origin
        assert other.closed == 0 and transport._idle_count == 1  # not yet expired: the timer is re-armed
        now[0] = 1000.09
        await other.wait_closed(1)
        assert transport._open == 0 and transport._idle_count == 0 and not transport._idle
        assert (await http.get(server.url("/json"))).status_code == 200  # a new connection
        assert server.connections == 2 and transport._expiry is not None
    assert transport._expiry is None  # aclose cancelled the timer
