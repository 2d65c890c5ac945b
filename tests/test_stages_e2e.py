"""Every stage at once, end to end: a started ``aiproxy serve`` with Redis (when
AIPROXY_TEST_REDIS_URL is set) and a database (PostgreSQL when AIPROXY_TEST_DATABASE_URL is
set, else SQLite), in front of a fake OpenAI server, driven by the real ``openai`` SDK with
a virtual key made through the management API.

One story, checked from every side: the answers' headers (rate limit, cache, cost), the
upstream's own count of calls, the 429 at the limit, the usage log read back through
``/api/ai/usage``, and ``/metrics``. Each stage has its own tests; this one proves they
agree with each other when they run together, as operators run them.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeOpenAI
from tests.helpers import started_proxy

UPSTREAM_KEY = "sk-fake-upstream-key-e2e"
MASTER = "sk-master-stages-e2e-0123456789"
LIMIT = 6  # requests per window for the pro tier in this config
PRICE_IN, PRICE_OUT = Decimal("2.5"), Decimal("10")  # USD per million tokens


def _database_url(tmp: Path) -> str:
    pg = os.environ.get("AIPROXY_TEST_DATABASE_URL")
    if not pg:
        return f"sqlite+aiosqlite:///{tmp}/stages.db"
    import asyncio

    import asyncpg

    name = f"aiproxy_stages_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(pg.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"{pg.rpartition('/')[0]}/{name}"


def _drop_database(url: str) -> None:
    pg = os.environ.get("AIPROXY_TEST_DATABASE_URL")
    if not pg or not url.startswith("postgresql"):
        return
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(pg.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeOpenAI]]:
    tmp = tmp_path_factory.mktemp("stages-e2e")
    db = _database_url(tmp)
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "master_key": MASTER},
        "plugins": {"dir": None},
        "database": {"url": db, "migrate_on_start": True},
        "keys": {"required": True},
        "limits": {"tiers": {"pro": {"requests": LIMIT, "window_seconds": 3600,
                                     "tokens_per_minute": 1_000_000}}},
        "cache": {"enabled": True},
        "cost": {"alert_threshold_usd": 0},
        "usage": {"flush_interval": 0.1},
        "models": [{"name": "gpt-e2e", "provider": "openai", "model": "gpt-4o-mini",
                    "price": {"input": str(PRICE_IN), "output": str(PRICE_OUT)}}],
    }
    redis = os.environ.get("AIPROXY_TEST_REDIS_URL")
    if redis:
        config["redis"] = {"url": redis, "prefix": f"stages-e2e-{uuid.uuid4().hex[:8]}:"}
    try:
        with FakeOpenAI(api_key=UPSTREAM_KEY) as fake:
            config["providers"] = {"openai": {"plugin": "openai", "api_base": f"{fake.url}/v1",
                                              "api_key": UPSTREAM_KEY}}
            with started_proxy(config, tmp) as proxy:
                yield proxy.url, fake
    finally:
        _drop_database(db)


def _admin(url: str, method: str, path: str, **kwargs: Any) -> Any:
    r = httpx.request(method, f"{url}{path}", headers={"authorization": f"Bearer {MASTER}"},
                      timeout=10, **kwargs)
    assert r.status_code < 300, r.text
    return r.json()


def _chat(client: openai.OpenAI, content: str, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-e2e", messages=[{"role": "user", "content": content}], **extra)


def test_every_stage_agrees_on_one_tenants_calls(gateway):
    url, fake = gateway
    tenant = _admin(url, "POST", "/api/ai/tenants", json={"name": f"acme-{uuid.uuid4().hex[:6]}"})
    made = _admin(url, "POST", "/api/ai/keys", json={"tenant_id": tenant["id"], "tier": "pro"})
    key = made["key"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=15)
    upstream_before = len(fake.requests)

    # 1. a deterministic call: looked up, missed, priced, counted
    first = _chat(client, "the same question", temperature=0)
    answer = first.parse()
    assert first.headers["x-aiproxy-cache"] == "miss"
    assert first.headers["x-ratelimit-limit-requests"] == str(LIMIT)
    assert first.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 1)
    cost = Decimal(first.headers["x-aiproxy-cost"])
    usage = answer.usage
    assert cost == (usage.prompt_tokens * PRICE_IN + usage.completion_tokens * PRICE_OUT) / 10**6
    assert cost > 0

    # 2. the same call again: served from the cache, free, still counted by the rate limit
    again = _chat(client, "the same question", temperature=0)
    assert again.headers["x-aiproxy-cache"] == "hit"
    assert Decimal(again.headers["x-aiproxy-cost"]) == 0
    assert again.parse().choices[0].message.content == answer.choices[0].message.content
    assert again.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 2)
    assert len(fake.requests) == upstream_before + 1

    # 3. a stream (sampled: not cacheable) also passes every stage
    with client.chat.completions.with_streaming_response.create(
            model="gpt-e2e", messages=[{"role": "user", "content": "stream please"}], stream=True) as s:
        assert s.headers["x-aiproxy-cache"] == "skip"
        assert s.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 3)
        text = "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices)
    assert text

    # 4. up to the limit, then a 429 that names it and says when to retry
    for n in range(LIMIT - 3):
        _chat(client, f"filler {n}")
    with pytest.raises(openai.RateLimitError) as refused:
        _chat(client, "one too many")
    assert int(refused.value.response.headers["retry-after"]) > 0
    assert str(LIMIT) in refused.value.message and "request" in refused.value.message
    answered = LIMIT  # the refused call is logged as an error, not answered
    upstream_calls = len(fake.requests) - upstream_before
    assert upstream_calls == answered - 1  # one came from the cache

    # 5. the usage log: one row per call, the cost the headers said, the cache hit marked
    deadline, log = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        log = _admin(url, "GET", "/api/ai/usage", params={"tenant_id": tenant["id"], "limit": 50})
        if log["totals"]["total"]["requests"] >= answered + 1:
            break
        time.sleep(0.1)
    assert log is not None
    total = log["totals"]["total"]
    assert (total["requests"], total["errors"]) == (answered + 1, 1), total
    rows = log["data"]
    assert {r["key_id"] for r in rows} == {made["id"]}
    assert sum(1 for r in rows if r["cached"]) == 1
    assert [r["status"] for r in rows].count(429) == 1
    first_row = next(r for r in rows if r["request_id"] == first.headers["x-request-id"])
    assert Decimal(str(first_row["cost"])) == cost
    assert first_row["prompt_tokens"] == usage.prompt_tokens

    # 6. metrics: the same calls, the same spend, the one cache hit
    scraped = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {MASTER}"}, timeout=10)
    assert scraped.status_code == 200
    samples = [s for family in text_string_to_metric_families(scraped.text) for s in family.samples]

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("aiproxy_requests_total", model="gpt-e2e", status="200") == answered
    assert value("aiproxy_requests_total", status="429") == 1
    assert value("aiproxy_cache_requests_total", model="gpt-e2e", result="hit") == 1
    spent = value("aiproxy_cost_usd_total", model="gpt-e2e", tenant=tenant["id"])
    logged = sum(Decimal(str(r["cost"] or 0)) for r in rows)
    assert abs(Decimal(str(spent)) - logged) < Decimal("1e-9")
