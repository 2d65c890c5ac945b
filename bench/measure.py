"""What the runner measures with: processes pinned to cores, wrk, /proc, a streaming client."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAT_PATH = "/v1/chat/completions"
BODY = (b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello in one short sentence."}],'
        b'"max_tokens":16}')
STREAM_BODY = BODY[:-1] + b',"stream":true}'
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: Sequence[str], core: int | None) -> list[str]:
    """``cmd`` under ``taskset -c core`` where the machine has that core and taskset."""
    if core is None or shutil.which("taskset") is None or core >= (os.cpu_count() or 1):
        return list(cmd)
    return ["taskset", "-c", str(core), *cmd]


@dataclass
class Processes:
    """Every process the run starts; all of them are stopped on the way out, whatever happens."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: Sequence[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = log.open("ab")
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own group: stop() ends its children too
        out.close()
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.started)):
            self.stop(proc)


# ---------------------------------------------------------------- /proc
def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a gateway may fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants so far."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / TICK


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, MB."""
    kb = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
        except OSError:
            continue
    return kb / 1024


# ---------------------------------------------------------------- HTTP
def post(port: int, body: bytes = BODY, headers: dict[str, str] | None = None, timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", CHAT_PATH, body, {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def stage_headers(port: int, headers: dict[str, str]) -> dict[str, str]:
    """One cacheable call (a new body each time): the answer's stage headers, to prove the
    stages under test really ran (x-aiproxy-cache, x-aiproxy-cost, x-ratelimit-*)."""
    nonce = os.urandom(6).hex().encode()
    body = (b'{"model":"bench-model","messages":[{"role":"user","content":"check ' + nonce
            + b'"}],"max_tokens":16,"temperature":0}')
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", CHAT_PATH, body, {"content-type": "application/json", **headers})
        resp = conn.getresponse()
        resp.read()
        return {k.lower(): v for k, v in resp.getheaders()
                if k.lower().startswith(("x-aiproxy", "x-ratelimit"))}
    finally:
        conn.close()


def wait_first_200(port: int, proc: subprocess.Popen[bytes], limit: float, headers: dict[str, str]) -> float:
    """Seconds from now until a chat completion through ``port`` answers 200."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering")
        try:
            if post(port, headers=headers, timeout=2.0) == 200:
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"no 200 on port {port} within {limit:.0f} s")


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_ms_per_req: float | None = None


_BENCH = re.compile(r"BENCH p50_us=(\d+) p99_us=(\d+) mean_us=[\d.]+ requests=(\d+) non2xx=(\d+)")
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_SOCK = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def wrk(port: int, conns: int, seconds: float, core: int | None, auth: str | None = None,
        cpu_pid: int | None = None, unique: bool = False) -> Load:
    """A closed loop of ``conns`` connections for ``seconds`` s (wrk), with the CPU ``cpu_pid`` used.

    ``unique``: every request's body differs (and is cacheable), so a response cache misses.
    """
    env = {**os.environ, "BENCH_AUTH": auth or "", "BENCH_UNIQUE": os.urandom(6).hex() if unique else ""}
    cmd = pinned(["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s", "-s",
                  str(HERE / "post.lua"), f"http://127.0.0.1:{port}{CHAT_PATH}"], core)
    before = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 30).stdout
    used = cpu_seconds(cpu_pid) - before if cpu_pid else 0.0
    m, rps = _BENCH.search(out), _RPS.search(out)
    if not m or not rps:
        raise RuntimeError(f"could not read wrk's output:\n{out}")
    requests, non2xx = int(m[3]), int(m[4])
    sock = _SOCK.search(out)
    errors = non2xx + (sum(int(x) for x in sock.groups()) if sock else 0)
    return Load(rps=float(rps[1]), p50_ms=int(m[1]) / 1000, p99_ms=int(m[2]) / 1000, requests=requests,
                errors=errors, cpu_ms_per_req=(used * 1000 / requests) if cpu_pid and requests else None)


# ---------------------------------------------------------------- streaming
@dataclass
class Stream:
    ttft_ms: float  # p50 time to the first event
    gap_ms: float  # p50 of each stream's mean gap between events
    streams: int


async def _one_stream(port: int, auth: str | None, body: bytes) -> tuple[float, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (f"POST {CHAT_PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n" + (f"authorization: Bearer {auth}\r\n" if auth else "")
                + "connection: close\r\n\r\n").encode()
        start = time.perf_counter()
        writer.write(head + body)
        stamps: list[float] = []
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = time.perf_counter()
            stamps.extend([now] * data.count(b"data: "))
            if b"data: [DONE]" in data:
                break
        if len(stamps) < 2:
            raise RuntimeError(f"stream through port {port} sent {len(stamps)} events")
        return (stamps[0] - start), (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    finally:
        writer.close()


def streams(port: int, count: int, seconds: float, auth: str | None = None,
            model: str = "bench-model") -> Stream:
    """``count`` streams one after another (at most ``seconds`` s): p50 first event and gap."""
    body = STREAM_BODY.replace(b'"bench-model"', b'"' + model.encode() + b'"')

    async def run() -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        deadline = time.perf_counter() + seconds
        for _ in range(count):
            out.append(await asyncio.wait_for(_one_stream(port, auth, body), 10))
            if time.perf_counter() > deadline:
                break
        return out

    got = asyncio.run(run())
    return Stream(ttft_ms=statistics.median(t for t, _ in got) * 1000,
                  gap_ms=statistics.median(g for _, g in got) * 1000, streams=len(got))

