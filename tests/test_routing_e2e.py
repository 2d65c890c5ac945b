"""Routing end to end: a started ``aiproxy serve`` in front of two real fake OpenAI
upstreams, a port where nothing listens, and the mock provider failing 20% of calls;
driven by the real ``openai`` SDK and by a bounded concurrent load."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.fakes import FakeOpenAI
from tests.helpers import free_port, started_proxy

KEY = "sk-fake-upstream-key"


@dataclass
class Served:
    url: str
    main: FakeOpenAI
    backup: FakeOpenAI


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("routing")
    dead = free_port()  # nothing listens here: every attempt is a connect error
    with FakeOpenAI(api_key=KEY) as main, FakeOpenAI(api_key=KEY) as backup:
        config = {
            "server": {"host": "127.0.0.1"},
            "plugins": {"dir": None},
            "providers": {
                "dead": {"plugin": "openai", "api_base": f"http://127.0.0.1:{dead}/v1", "api_key": KEY},
                "main": {"plugin": "openai", "api_base": f"{main.url}/v1", "api_key": KEY},
                "backup": {"plugin": "openai", "api_base": f"{backup.url}/v1", "api_key": KEY},
                "mock": {"plugin": "mock", "options": {"seed": 11}},
            },
            "models": [
                {"name": "pooled", "provider": "dead", "model": "gpt-4o-mini", "id": "dead",
                 "strategy": "round_robin", "fallbacks": ["spare"], "backoff": {"base": 0.01, "max": 0.05}},
                {"name": "pooled", "provider": "main", "model": "gpt-4o-mini", "id": "main"},
                {"name": "spare", "provider": "backup", "model": "gpt-4o-mini", "id": "spare"},
                {"name": "flaky", "provider": "mock", "retries": 1, "backoff": {"base": 0.005, "max": 0.02},
                 "cooldown": False, "options": {"error": 503, "error_rate": 0.2, "tokens": 5}},
            ],
        }
        with started_proxy(config, tmp) as started:
            yield Served(started.url, main, backup)


@pytest.fixture
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=15.0) as c:
        yield c


def _marker() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


def test_a_dead_deployment_is_routed_around_for_the_sdk(served: Served, client: openai.OpenAI) -> None:
    for stream in (False, True):
        marker = _marker()
        raw = client.chat.completions.with_raw_response.create(
            model="pooled", stream=stream, messages=[{"role": "user", "content": f"hello {marker}"}])
        assert raw.headers["x-aiproxy-deployment"] == "main"
        body = raw.parse()
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in body if c.choices)
        else:
            text = body.choices[0].message.content or ""
        assert text.split()
        assert len(served.main.with_text(marker)) == 1


def test_fallback_serves_when_the_whole_pool_fails(served: Served, client: openai.OpenAI) -> None:
    marker = _marker()
    with served.main.configured(error=503):
        raw = client.chat.completions.with_raw_response.create(
            model="pooled", messages=[{"role": "user", "content": f"hello {marker}"}])
    assert raw.headers["x-aiproxy-deployment"] == "spare"
    assert int(raw.headers["x-aiproxy-attempts"]) >= 2
    assert raw.parse().choices[0].message.content
    assert len(served.backup.with_text(marker)) == 1


def test_a_stream_that_breaks_after_its_first_byte_ends_with_an_sdk_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="flaky", stream=True, messages=[{"role": "user", "content": "x"}],
        extra_body={"mock": {"error_after": 3, "error_rate": 0, "error": None}})
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 3
    assert "upstream status 502" in str(info.value.message)


def test_a_client_that_gives_up_cancels_the_attempt_and_nothing_is_retried(
        served: Served, client: openai.OpenAI) -> None:
    """"pooled" would go on to its other deployment and then to "spare" (the backup
    fake) if its loop outlived the client; it must not."""
    marker = _marker()
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=0.5) as impatient:
        with served.main.configured(latency_ms=3000), pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model="pooled", messages=[{"role": "user", "content": marker}])
    assert served.main.wait_for(lambda r: marker in r.text(), timeout=2) is not None
    # a retry or fallback would start the moment the attempt failed; one more round trip
    # through the same server leaves it every chance to show up
    assert client.chat.completions.create(model="spare", messages=[{"role": "user", "content": "next"}])
    assert served.backup.with_text(marker) == []
    assert len(served.main.with_text(marker)) == 1


async def test_load_with_a_fifth_of_upstream_calls_failing(served: Served) -> None:
    """400 calls, 20 at a time, half of them streams: each one ends in time with a
    200 (its answer complete) or an OpenAI-shaped 503 after its retry also failed."""
    outcomes: list[str] = []
    bodies = iter(range(400))

    async def worker(http: httpx.AsyncClient) -> None:
        for i in bodies:
            body = {"model": "flaky", "stream": i % 2 == 1,
                    "messages": [{"role": "user", "content": f"load {i}"}]}
            r = await http.post("/v1/chat/completions", json=body)
            if r.status_code == 200:
                if body["stream"]:
                    assert r.text.endswith("data: [DONE]\n\n"), r.text
                else:
                    assert r.json()["choices"][0]["message"]["content"], r.text
                outcomes.append("ok")
                continue
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "service_unavailable" and error["code"] == "upstream_unavailable"
            assert r.headers["x-aiproxy-attempts"] == "2"
            outcomes.append("error")

    async with httpx.AsyncClient(base_url=served.url, timeout=10, trust_env=False) as http:
        await asyncio.wait_for(asyncio.gather(*(worker(http) for _ in range(20))), timeout=60)
    assert len(outcomes) == 400
    errors = outcomes.count("error")
    assert 0 < errors < 40  # about 4% (0.2 x 0.2) fail twice; the rest were saved by their retry
