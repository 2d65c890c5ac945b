"""The test TCP forwarder (tests/tcp_proxy.py) in front of the real Redis: it forwards, a
cut resets what is open (both ends: the server sees its client go) and refuses new
connections, a restore forwards again on the same port, and a stall lets requests through
but holds the replies (applied, never acknowledged)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
import redis

from tests.tcp_proxy import TcpProxy

REDIS_URL = os.environ.get("AIPROXY_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="AIPROXY_TEST_REDIS_URL is not set")


@pytest.fixture
def direct() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL or "")
    yield client
    client.close()


def command(sock: socket.socket, *words: str) -> bytes:
    """One RESP command on a raw socket; its first reply line."""
    payload = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    sock.sendall(payload.encode())
    reply = b""
    while not reply.endswith(b"\r\n"):
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed")
        reply += data
    return reply


def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    """Wait (bounded) for a condition another thread or process brings about."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def named(client: redis.Redis, name: str) -> list[dict]:
    return [c for c in client.client_list() if c.get("name") == name]


def test_it_forwards_both_ways(direct):
    key = f"aiproxy-test:{uuid.uuid4().hex}:tcp"
    with TcpProxy.for_url(REDIS_URL or "") as proxy:
        assert proxy.port not in (0, 6379)
        through = redis.Redis.from_url(proxy.url(REDIS_URL or ""))
        try:
            assert through.set(key, b"v" * 200_000, ex=60)  # bigger than one read
            assert direct.get(key) == b"v" * 200_000
            direct.set(key, "from-direct", ex=60)
            assert through.get(key) == b"from-direct"
        finally:
            through.close()
            direct.delete(key)
        assert proxy.accepted == 1


def test_cut_resets_open_connections_at_both_ends_and_refuses_new_ones(direct):
    name = f"aiproxy-test-{uuid.uuid4().hex[:12]}"
    with TcpProxy.for_url(REDIS_URL or "") as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            assert command(sock, "CLIENT", "SETNAME", name) == b"+OK\r\n"
            assert len(named(direct, name)) == 1
            proxy.cut()
            with pytest.raises(OSError):  # reset, or closed (ConnectionError is an OSError)
                command(sock, "PING")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
            # the server's end goes too: a cut connection must not stay open on the server
            # (a PostgreSQL test database could not be dropped while it did)
            assert eventually(lambda: not named(direct, name)), "Redis still has the cut connection"
        finally:
            sock.close()


def test_restore_forwards_again_on_the_same_port(direct):
    key = f"aiproxy-test:{uuid.uuid4().hex}:tcp"
    with TcpProxy.for_url(REDIS_URL or "") as proxy:
        port = proxy.port
        before = redis.Redis.from_url(proxy.url(REDIS_URL or ""), retry=None)
        assert before.ping()
        proxy.cut()
        with pytest.raises(redis.ConnectionError):
            before.ping()
        proxy.restore()
        assert proxy.port == port
        after = redis.Redis.from_url(proxy.url(REDIS_URL or ""), retry=None)
        try:
            assert after.set(key, "back", ex=60) and direct.get(key) == b"back"
            assert before.ping()  # a client that lost its connection reconnects through it
        finally:
            after.close()
            before.close()
            direct.delete(key)
        proxy.restore()  # restoring what is up changes nothing
        assert proxy.port == port
        assert proxy.accepted == 3


def test_a_stall_applies_the_command_but_holds_its_reply(direct):
    key = f"aiproxy-test:{uuid.uuid4().hex}:tcp"
    with TcpProxy.for_url(REDIS_URL or "") as proxy:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            db = urlsplit(REDIS_URL or "").path.strip("/") or "0"
            assert command(sock, "SELECT", db) == b"+OK\r\n"  # the database `direct` reads
            proxy.stall()
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                command(sock, "INCRBY", key, "7")
            # the server applied it: only the answer is held
            assert eventually(lambda: direct.get(key) == b"7")
            proxy.resume()
            sock.settimeout(5)
            # the held reply comes first (the GET's may come in the same read)
            assert command(sock, "GET", key).startswith(b":7\r\n")
        finally:
            sock.close()
            direct.delete(key)


def test_a_cut_ends_the_forwarding_threads():
    import threading

    with TcpProxy.for_url(REDIS_URL or "") as proxy:
        def forwarding() -> int:
            return sum(1 for t in threading.enumerate() if t.name.startswith(f"tcp-proxy-{proxy.port}-"))

        socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
        try:
            for sock in socks:
                assert command(sock, "PING") == b"+PONG\r\n"
            assert forwarding() == 1 + 2 * 3  # the listener, two pumps a connection
            proxy.cut()
            assert eventually(lambda: forwarding() == 0)
        finally:
            for sock in socks:
                sock.close()


def test_url_keeps_everything_but_the_port():
    proxy = TcpProxy(1)  # a target nobody listens on: only the URL is used here
    try:
        assert proxy.url("redis://:secret@127.0.0.1:6379/15") == f"redis://:secret@127.0.0.1:{proxy.port}/15"
        assert proxy.url("postgresql+asyncpg://postgres@127.0.0.1:5432/test") == \
            f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/test"
        proxy.close()
        for url, port in (("redis://127.0.0.1:6380/0", 6380), ("redis://localhost/0", 6379),
                          ("postgresql+asyncpg://postgres@127.0.0.1/test", 5432)):
            with TcpProxy.for_url(url) as other:
                assert other.target[1] == port
        with pytest.raises(ValueError, match="no default port"):
            TcpProxy.for_url("http://127.0.0.1/x")
    finally:
        proxy.close()
