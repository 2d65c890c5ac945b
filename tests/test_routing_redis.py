"""Cooldown state shared through a real Redis (``AIPROXY_TEST_REDIS_URL``), and what
happens when Redis cannot be reached (no Redis needed for that one)."""

from __future__ import annotations

import asyncio
import logging
import os

import httpx
import pytest

from aiproxy.routing.breaker import RedisBreaker
from aiproxy.routing.settings import Cooldown
from tests.routing_support import A_URL, B_URL, FakeClock, answer, failure, pool, proxy

REDIS_URL = os.environ.get("AIPROXY_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="AIPROXY_TEST_REDIS_URL is not set")



@needs_redis
async def test_a_cooldown_seen_by_one_replica_reaches_the_other(prefix):
    models = pool("a", "b", strategy="round_robin", cooldown={"failures": 2, "window": 60, "duration": 30})
    redis = {"url": REDIS_URL, "prefix": prefix}
    async with proxy(models, redis=redis) as one, proxy(models, redis=redis) as two:
        for p in (one, two):
            p.upstream.post(A_URL).mock(return_value=failure(503))
            p.upstream.post(B_URL).respond(200, json=answer("b"))
        await one.chat()  # a fails once here (then b serves)…
        await two.chat()  # …and once there: two failures in the window, counted in Redis
        assert two.router.breaker.cooling("a") > 29
        assert one.router.breaker.cooling("a") == 0  # one has not looked yet
        one.clock.now += 2  # past the sync interval: the next call reads the shared state
        served = [(await one.chat()).headers["x-aiproxy-deployment"] for _ in range(4)]
        assert served == ["b"] * 4 and one.upstream.routes[0].call_count == 1
        assert 25 < one.router.breaker.cooling("a") <= 30


@needs_redis
async def test_failures_are_counted_atomically_and_a_success_clears_them(prefix):
    cd = Cooldown(failures=20, window=60, duration=30)
    breakers = [RedisBreaker(REDIS_URL or "", prefix, FakeClock()) for _ in range(4)]
    try:
        opened = await asyncio.gather(*(b.failed("d", cd) for b in breakers for _ in range(5)))
        assert opened.count(True) == 1  # exactly the twentieth failure opened it, whichever replica saw it
        await breakers[1].sync(["d"])
        assert breakers[1].cooling("d") > 29
        ttl = await breakers[0].redis.pttl(f"{prefix}breaker:d:cooldown")
        assert 29_000 < ttl <= 30_000
        nineteen = Cooldown(failures=20, window=60, duration=30)
        others = await asyncio.gather(*(b.failed("e", nineteen) for b in breakers for _ in range(4)),
                                      breakers[0].failed("e", nineteen), breakers[1].failed("e", nineteen),
                                      breakers[2].failed("e", nineteen))
        assert not any(others)  # nineteen failures: not yet
        assert int(await breakers[0].redis.get(f"{prefix}breaker:e:failures")) == 19
        await breakers[3].succeeded("e")
        assert await breakers[0].redis.exists(f"{prefix}breaker:e:failures") == 0
    finally:
        for b in breakers:
            await b.aclose()


async def test_an_unreachable_redis_falls_back_to_local_state_with_a_warning(caplog):
    clock = FakeClock()
    breaker = RedisBreaker("redis://127.0.0.1:1/0", "x:", clock)  # nothing listens on port 1
    cd = Cooldown(failures=2, window=60, duration=30)
    try:
        with caplog.at_level(logging.WARNING, logger="aiproxy.routing"):
            await breaker.sync(["d"])
            assert not await breaker.failed("d", cd)
            assert await breaker.failed("d", cd)  # counted in process
        assert breaker.cooling("d") == 30
        warnings = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
        assert len(warnings) == 1  # said once, not per call
    finally:
        await breaker.aclose()


async def test_calls_succeed_while_the_breaker_store_is_down():
    models = pool("a", "b", cooldown={"failures": 1, "window": 60, "duration": 30})
    async with proxy(models, redis={"url": "redis://127.0.0.1:1/0"}) as p:
        p.upstream.post(A_URL).mock(return_value=failure(503))
        p.upstream.post(B_URL).mock(side_effect=lambda request: httpx.Response(200, json=answer()))
        answers = [await p.chat() for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert p.router.breaker.cooling("a") > 0  # the local state took over


async def test_a_redis_url_redis_cannot_use_leaves_cooldowns_in_process(caplog):
    from aiproxy.routing.breaker import LocalBreaker

    with caplog.at_level(logging.WARNING, logger="aiproxy.router"):
        async with proxy(pool("a"), redis={"url": "http://user:hunter2@127.0.0.1:6379"}) as p:
            p.upstream.post(A_URL).respond(200, json=answer())
            assert (await p.chat()).status_code == 200
            assert type(p.router.breaker) is LocalBreaker
    assert any("cooldown state stays in process" in r.getMessage() for r in caplog.records)
    assert "hunter2" not in caplog.text
