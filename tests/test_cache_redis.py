"""The response cache on a real Redis (``AIPROXY_TEST_REDIS_URL``): tenant isolation,
single flight (per replica), values stored with their TTL, and an outage (a TCP forwarder
cut in front of Redis) that is a miss, never a failed call, followed by recovery."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from tests.cache_support import DET, Upstream, check_tenant_isolation, config, content, gateway, start, until
from tests.tcp_proxy import TcpProxy

REDIS_URL = os.environ.get("AIPROXY_TEST_REDIS_URL")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="AIPROXY_TEST_REDIS_URL is not set")



async def _keys(prefix: str) -> dict[bytes, int]:
    """Every key under ``prefix`` and its remaining TTL in milliseconds."""
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL or "")
    try:
        return {k: await client.pttl(k) async for k in client.scan_iter(match=f"{prefix}*")}
    finally:
        await client.aclose()


async def test_tenant_a_never_gets_tenant_bs_answer_on_redis(prefix: str) -> None:
    async with gateway(config(redis={"url": REDIS_URL, "prefix": prefix})) as g:
        assert g.cache.redis is not None
        await check_tenant_isolation(g)
        stored = await _keys(prefix)
        assert len(stored) == 5 and all(k.startswith(f"{prefix}cache:".encode()) for k in stored)
        assert "aiproxy_cache_entries" not in g.cache.aiproxy_stats()  # nothing kept in process


async def test_two_replicas_share_answers_through_redis(prefix: str) -> None:
    cfg = config(redis={"url": REDIS_URL, "prefix": prefix})
    async with gateway(cfg) as one, gateway(cfg) as two:
        assert content(await one.post(DET, "a1")) == "answer 1"
        assert content(await two.post(DET, "a2")) == "answer 1"  # the other replica's answer
        assert content(await two.post(DET, "b1")) == "answer 1"  # its own upstream's first answer
        assert (one.chat.call_count, two.chat.call_count) == (1, 1)


async def test_single_flight_is_per_replica_on_redis(prefix: str) -> None:
    """Identical misses share one upstream call within a replica; each replica leads its own
    (no lock across processes: at most one call per replica, not one in all)."""
    cfg = config(redis={"url": REDIS_URL, "prefix": prefix})
    async with gateway(cfg) as one, gateway(cfg) as two:
        one.chat.side_effect, two.chat.side_effect = up_one, up_two = Upstream(), Upstream()
        calls = [start(g, DET) for g in (one, two) for _ in range(6)]
        await until(lambda: one.cache.flights.waits == two.cache.flights.waits == 5)
        assert up_one.calls == up_two.calls == 1
        up_one.gate.set()
        up_two.gate.set()
        answers = [content(r) for r in await asyncio.gather(*calls)]
        assert answers == ["answer 1"] * 12  # each replica's own first answer
        assert one.cache.aiproxy_stats()["aiproxy_cache_flight_shared_total"] == 5
        await one.cache.settle()
        await two.cache.settle()
        assert len(await _keys(prefix)) == 1


async def test_values_are_stored_with_their_ttl(prefix: str) -> None:
    async with gateway(config(redis={"url": REDIS_URL, "prefix": prefix})) as g:
        await g.post(DET)
        (ttl,) = (await _keys(prefix)).values()
        assert 3_590_000 < ttl <= 3_600_000  # chat: one hour
        await g.post({**DET, "model": "gpt-test", "messages": [{"role": "user", "content": "b"}]},
                     **{"x-aiproxy-cache-ttl": "120"})
        ttls = sorted((await _keys(prefix)).values())
        assert 110_000 < ttls[0] <= 120_000


async def test_a_redis_outage_is_a_miss_and_the_cache_comes_back(prefix: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with TcpProxy.for_url(REDIS_URL or "") as tcp:
        cfg = config({"redis_retry_seconds": 5}, redis={"url": tcp.url(REDIS_URL or ""), "prefix": prefix})
        async with gateway(cfg) as g:
            assert content(await g.post(DET)) == "answer 1"
            assert content(await g.post(DET)) == "answer 1"
            tcp.cut()
            with caplog.at_level(logging.WARNING, logger="aiproxy.cache"):
                down = [await g.post(DET) for _ in range(3)]
                other = {**DET, "messages": [{"role": "user", "content": "while Redis was away"}]}
                assert content(await g.post(other)) == "answer 5"
            assert [content(r) for r in down] == ["answer 2", "answer 3", "answer 4"]
            assert all(r.headers["x-aiproxy-cache"] == "miss" for r in down)
            stats = g.cache.aiproxy_stats()
            assert stats["aiproxy_cache_backend_errors_total"] == 1  # then Redis is left alone for 5 s
            warnings = [r for r in caplog.records if r.name == "aiproxy.cache"]
            assert len(warnings) == 1 and "Redis failed" in warnings[0].getMessage()
            tcp.restore()
            assert content(await g.post(DET)) == "answer 6"  # still within the 5 s: not asked
            g.clock.now += 5
            back = await g.post(DET)
            assert content(back) == "answer 1" and back.headers["x-aiproxy-cache"] == "hit"
            assert content(await g.post(other)) == "answer 7"  # not stored while Redis was away
            assert content(await g.post(other)) == "answer 7"  # stored now
            assert g.cache.aiproxy_stats()["aiproxy_cache_backend_errors_total"] == 1
