"""``/metrics`` of a started ``aiproxy serve --workers 2``, driven by the real openai SDK:
whichever worker is scraped answers for both (prometheus multiprocess mode), plugin stats
included, and the run's shared directory is gone once the server stops."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import started_proxy
from tests.metrics_support import STAGES, Scrape

MASTER = "sk-master-workers-test"
SCRAPER = "scrape-token-workers-test"
PLUGIN = '''
import os
from aiproxy import hookimpl


class WorkerTag:
    """Says which worker answered, and counts its calls through aiproxy_stats."""

    def __init__(self):
        self.calls = 0

    @hookimpl
    def aiproxy_after_call(self, call):
        self.calls += 1
        call.response_headers["x-test-worker"] = str(os.getpid())

    @hookimpl
    def aiproxy_stats(self):
        return {"aiproxy_test_worker_calls_total": self.calls, "aiproxy_test_workers": 1}


def aiproxy_plugin(config):
    return WorkerTag()
'''


def scrape(url: str) -> Scrape:
    # a new connection each time, so any worker may answer
    r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {SCRAPER}"}, timeout=10,
                  trust_env=False)
    assert r.status_code == 200, r.text
    return Scrape(r.text)


async def drive(url: str) -> tuple[int, int, set[str]]:
    """Calls on fresh connections until both workers have answered (bounded): (calls, streams, pids)."""
    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_keepalive_connections=0), trust_env=False)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=MASTER, max_retries=0, timeout=15,
                                http_client=http)
    pids: set[str] = set()
    calls = streams = 0

    async def whole() -> None:
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-a", messages=[{"role": "user", "content": "hi"}],
            extra_body={"mock": {"latency_ms": 20}})
        assert raw.parse().choices[0].message.content
        pids.add(raw.headers["x-test-worker"])

    async def streamed() -> None:
        stream = await client.chat.completions.create(model="mock-a", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert [chunk async for chunk in stream]

    try:
        deadline = time.monotonic() + 30
        while (len(pids) < 2 or calls < 24) and calls < 400 and time.monotonic() < deadline:
            await asyncio.gather(*[whole() for _ in range(6)], streamed(), streamed())
            calls += 8
            streams += 2
    finally:
        await client.close()
    return calls, streams, pids


def test_each_scrape_answers_for_every_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "worker_tag.py").write_text(PLUGIN)
    shared_parent = tmp_path / "tmp"
    shared_parent.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared_parent))  # where the run's multiprocess directory goes
    config = {
        "server": {"host": "127.0.0.1", "master_key": MASTER},
        "plugins": {"dir": str(tmp_path / "plugins"), "disable": STAGES},
        "providers": {"mock": {"plugin": "mock"}},
        "models": [{"name": "mock-*", "provider": "mock"}],
        "metrics": {"key": SCRAPER, "sync_interval": 0.2},
    }
    with started_proxy(config, tmp_path, "--workers", "2") as server:
        calls, streams, pids = asyncio.run(drive(server.url))
        assert len(pids) == 2, f"only worker(s) {pids} answered {calls} calls"
        shared = list(shared_parent.glob("aiproxy-metrics-*"))
        assert len(shared) == 1
        files = {p.name for p in shared[0].iterdir()}
        assert {f"counter_{pid}.db" for pid in pids} <= files, files

        deadline = time.monotonic() + 10  # each worker copies its plugin stats every 0.2 s
        m = scrape(server.url)
        while m.value("aiproxy_test_worker_calls_total") != calls and time.monotonic() < deadline:
            time.sleep(0.2)
            m = scrape(server.url)
        assert m.value("aiproxy_test_worker_calls_total") == calls
        assert m.value("aiproxy_test_workers") == 2  # a gauge: summed over the live workers

        for _ in range(6):  # whichever worker answers, the sums are every worker's
            m = scrape(server.url)
            assert m.value("aiproxy_requests_total", provider="mock", model="mock-a", status="200") == calls
            assert m.total("aiproxy_requests_total") == calls
            whole = {"provider": "mock", "model": "mock-a"}
            assert m.value("aiproxy_request_duration_seconds_count", **whole,
                           stream="false") == calls - streams
            assert m.value("aiproxy_request_duration_seconds_bucket", **whole, stream="false",
                           le="+Inf") == calls - streams
            assert m.value("aiproxy_request_duration_seconds_count", **whole, stream="true") == streams
            assert m.value("aiproxy_time_to_first_token_seconds_count", **whole) == streams
            assert m.value("aiproxy_upstream_attempts_total", deployment="mock/mock-*#0",
                           result="success") == calls
            assert m.value("aiproxy_tokens_total", model="mock-a", tenant="", type="completion") > 0
        assert httpx.get(f"{server.url}/metrics", trust_env=False).status_code == 401
    assert not any(shared_parent.iterdir()), "the run's multiprocess directory was left behind"
