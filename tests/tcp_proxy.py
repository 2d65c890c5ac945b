"""A TCP forwarder on 127.0.0.1 in front of a real server (Redis, PostgreSQL), so a test
can take that server away mid-run and bring it back without stopping the shared one.

    with TcpProxy(6379) as proxy:          # forwards 127.0.0.1:<proxy.port> → :6379
        url = f"redis://127.0.0.1:{proxy.port}/15"
        ...
        proxy.cut()        # open connections are reset; new ones are refused
        proxy.restore()    # new connections are forwarded again (same port)
        proxy.stall()      # the server still gets every request; its replies are held
        proxy.resume()     # held replies go on (to a client that has not hung up)

Threads, not asyncio: it serves any test, sync or async, whatever loop runs it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "postgresql": 5432, "postgres": 5432}


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self.accepted = 0  # connections forwarded so far
        self._flowing = threading.Event()  # cleared: replies from the server are held
        self._flowing.set()
        self._listen()

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        """A proxy for the host and port of ``url`` (redis://…, postgresql+asyncpg://…); a URL
        without a port means the scheme's default one."""
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.split("+")[0])
        if port is None:
            raise ValueError(f"no port in {parts.scheme}://… and no default port for that scheme")
        return cls(port, parts.hostname or "127.0.0.1")

    def url(self, original: str) -> str:
        """``original`` with its port replaced by this proxy's."""
        parts = urlsplit(original)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        netloc_new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        return parts._replace(netloc=netloc_new).geturl()

    # ------------------------------------------------------------ control
    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`restore`.

        Closing a socket does not wake a thread blocked on it (Linux): the listener would
        go on accepting and each connection stay open to the server, its pump blocked in
        recv. So each is shut down first, which wakes it, then closed; with SO_LINGER 0 the
        close is a reset.
        """
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            _kill(listener)
        for conn in conns:
            _kill(conn, reset=True)
        self._flowing.set()  # a pump holding a reply wakes, finds its socket gone, and ends

    def stall(self) -> None:
        """Hold the server's replies; requests still reach it. A client's command is then
        applied by the server but never acknowledged: the client times out not knowing."""
        self._flowing.clear()

    def resume(self) -> None:
        """Let the server's replies through again."""
        self._flowing.set()

    def restore(self) -> None:
        """Forward new connections again, on the same port."""
        if self._listener is None:
            self._listen(self.port)

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing
    def _listen(self, port: int = 0) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name=f"tcp-proxy-{self.port}-accept").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
                self.accepted += 1
            pair = _Pair()
            for src, dst, gate in ((client, upstream, None), (upstream, client, self._flowing)):
                threading.Thread(target=self._pump, args=(pair, src, dst, gate), daemon=True,
                                 name=f"tcp-proxy-{self.port}-pump").start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket,
              gate: threading.Event | None) -> None:
        try:
            while data := src.recv(65536):
                if gate is not None:
                    gate.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # wakes the other pump of this pair
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            if pair.done():  # the second pump to end closes both, so no socket is left open
                with self._lock:
                    self._conns = [c for c in self._conns if c is not src and c is not dst]
                for s in (src, dst):
                    s.close()


class _Pair:
    """One forwarded connection: its two pumps count down to closing its sockets."""

    def __init__(self) -> None:
        self._left = 2
        self._lock = threading.Lock()

    def done(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


def _kill(sock: socket.socket, reset: bool = False) -> None:
    """Shut ``sock`` down (waking a thread blocked on it) and close it; a reset if asked."""
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
