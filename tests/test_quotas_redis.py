"""Quotas and budgets shared through a real Redis (``AIPROXY_TEST_REDIS_URL``): two apps
agree on one quota exactly, spend survives a gateway restart, counters expire after
their period, and Redis going away fails open (counted, logged once, caught up after)
or closed (503). Set but unreachable, the Redis URL fails these tests; it never skips them."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from aiproxy import tokens
from aiproxy.config import Config
from tests.conftest import OPENAI_BASE
from tests.helpers import error_of
from tests.quotas_support import Clock, Cost, epoch, key, quota_config, started
from tests.tcp_proxy import TcpProxy

REDIS_URL = os.environ.get("AIPROXY_TEST_REDIS_URL", "")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="AIPROXY_TEST_REDIS_URL is not set")
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 10}
EST = tokens.prompt(BODY, "gpt-4o-mini") + 10  # what a BODY call reserves


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    """A client on the test Redis with a prefix of this test's own (its keys deleted after).
    An unreachable server fails the test: set, the URL promises a Redis."""
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL, decode_responses=True)
    await client.ping()
    client.test_prefix = f"aiproxy-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield client
    finally:
        names = [n async for n in client.scan_iter(match=f"{client.test_prefix}*")]
        if names:
            await client.delete(*names)
        await client.aclose()


def shared(redis: Any, quotas: dict[str, Any], keys: list[dict[str, Any]], url: str = REDIS_URL) -> Config:
    return quota_config({"flush_interval": 0, **quotas}, keys,
                        redis={"url": url, "prefix": redis.test_prefix})


def through(proxy: TcpProxy, redis: Any) -> Config:
    """Key "ci" with 10,000 tokens a month, its counters reached through ``proxy``."""
    return shared(redis, {"redis_retry_seconds": 5}, [key("ci", monthly_limit_tokens=10_000)],
                  url=proxy.url(REDIS_URL))


def answer_of_exactly_the_estimate() -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": EST - 10, "completion_tokens": 10, "total_tokens": EST}}


async def test_two_apps_on_one_redis_let_exactly_the_quota_through(redis: Any) -> None:
    n, extra = 5, 4
    config = shared(redis, {}, [key("ci", monthly_limit_tokens=n * EST)])
    clock = Clock(epoch(2026, 11, 10))
    async with started(config, clock) as one, started(config, clock) as two:
        for app in (one, two):
            app.upstream.post(f"{OPENAI_BASE}/chat/completions").respond(
                200, json=answer_of_exactly_the_estimate())
        replies = await asyncio.gather(*((one if i % 2 else two).chat("ci", BODY) for i in range(n + extra)))
        codes = sorted(r.status_code for r in replies)
        assert codes == [200] * n + [429] * extra
        for r in replies:
            if r.status_code == 429:
                assert f"the monthly token limit of key config:ci is {n * EST:,} tokens" in \
                    error_of(r)["message"]
        assert float(await redis.get(f"{redis.test_prefix}quotas:tok:key:config:ci:2026-11")) == n * EST


async def test_spend_is_shared_and_survives_a_restart_and_counters_expire_after_their_period(
        redis: Any) -> None:
    config = shared(redis, {"budgets": {"tenants": {"acme": {"daily_usd": 1}}}},
                    [key("a", tenant="acme"), key("b", tenant="acme")])
    clock = Clock(epoch(2026, 11, 30, 12))
    async with started(config, clock, Cost(0.6)) as one, started(config, clock, Cost(0.6)) as two:
        assert (await one.chat("a")).status_code == 200
        assert (await two.chat("b")).status_code == 200  # $0.60 < $1: in; now $1.20
        assert (await one.chat("b")).status_code == 429
    async with started(config, clock, Cost(0.6)) as restarted:
        refused = await restarted.chat("a")
        assert refused.status_code == 429
        assert "the daily budget of tenant acme is $1.00 and $1.20 has been spent in 2026-11-30" in \
            error_of(refused)["message"]
    name = f"{redis.test_prefix}quotas:usd:tenant:acme:2026-11-30"
    left = await redis.pttl(name)  # 12 h to the end of the day, and a day's grace
    assert 36 * 3600_000 - 60_000 < left <= 36 * 3600_000


async def test_redis_going_away_fails_open_counted_logged_once_and_caught_up_after(
        redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(epoch(2026, 11, 10))
    name = f"{redis.test_prefix}quotas:tok:key:config:ci:2026-11"
    with TcpProxy.for_url(REDIS_URL) as proxy:
        config = through(proxy, redis)
        async with started(config, clock) as app:
            used = [(await app.chat("ci")).json()["usage"]["total_tokens"]]
            assert float(await redis.get(name)) == used[0]
            proxy.cut()
            with caplog.at_level(logging.ERROR, logger="aiproxy.quotas"):
                for _ in range(3):
                    r = await app.chat("ci")
                    assert r.status_code == 200, r.text  # let through unchecked
                    used.append(r.json()["usage"]["total_tokens"])
            errors = app.quotas.aiproxy_stats()["aiproxy_quotas_backend_errors_total"]
            assert errors == 1  # the reservation failed; within the retry window, no more tries
            assert len([r for r in caplog.records if "Redis is unreachable" in r.getMessage()]) == 1
            proxy.restore()
            clock.now += 5
            used.append((await app.chat("ci")).json()["usage"]["total_tokens"])
            assert float(await redis.get(name)) == sum(used)  # what it used meanwhile was paid in


async def test_redis_going_away_fails_closed_when_configured(redis: Any) -> None:
    clock = Clock(epoch(2026, 11, 10))
    with TcpProxy.for_url(REDIS_URL) as proxy:
        config = shared(redis, {"on_backend_error": "closed", "redis_retry_seconds": 5},
                        [key("ci", monthly_limit_tokens=10_000)], url=proxy.url(REDIS_URL))
        async with started(config, clock) as app:
            assert (await app.chat("ci")).status_code == 200
            proxy.cut()
            for _ in range(2):
                r = await app.chat("ci")
                assert r.status_code == 503
                assert error_of(r)["code"] == "quota_store_unavailable"
                assert r.headers["retry-after"] == "5"
            assert app.quotas.aiproxy_stats()["aiproxy_quotas_backend_errors_total"] == 1
            proxy.restore()
            clock.now += 5
            assert (await app.chat("ci")).status_code == 200


async def test_a_caller_with_no_quota_or_budget_costs_no_redis_round_trip(redis: Any) -> None:
    with TcpProxy.for_url(REDIS_URL) as proxy:
        config = shared(redis, {}, [key("free"), key("capped", monthly_limit_tokens=1000)],
                        url=proxy.url(REDIS_URL))
        proxy.cut()  # any round trip would now fail and be counted
        async with started(config, Clock(epoch(2026, 11, 10))) as app:
            assert [(await app.chat("free")).status_code for _ in range(3)] == [200] * 3
            assert app.quotas.aiproxy_stats()["aiproxy_quotas_backend_errors_total"] == 0
            assert (await app.chat("capped")).status_code == 200  # fails open…
            assert app.quotas.aiproxy_stats()["aiproxy_quotas_backend_errors_total"] == 1  # …after trying


async def test_a_call_cancelled_while_redis_reserves_for_it_gives_the_reservation_back(redis: Any) -> None:
    # before: a task cancelled (a shutdown, say) while the reserve script was in flight: Redis
    # took the tokens, call.state never held them, so no settle gave them back, ever
    clock = Clock(epoch(2026, 11, 10))
    name = f"{redis.test_prefix}quotas:tok:key:config:ci:2026-11"
    with TcpProxy.for_url(REDIS_URL) as proxy:
        config = shared(redis, {}, [key("ci", monthly_limit_tokens=10_000)], url=proxy.url(REDIS_URL))
        async with started(config, clock) as app:
            app.upstream.post(f"{OPENAI_BASE}/chat/completions").respond(
                json=answer_of_exactly_the_estimate())
            assert (await app.chat("ci", BODY)).status_code == 200  # the script is loaded
            proxy.stall()
            call = asyncio.create_task(app.chat("ci", BODY))
            for _ in range(200):  # bounded: until Redis has taken this call's reservation
                if float(await redis.get(name)) == 2 * EST:
                    break
                await asyncio.sleep(0.01)
            assert float(await redis.get(name)) == 2 * EST
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            proxy.resume()
            await app.quotas.tick()  # the periodic work sends the giving back (as a next call would)
            assert float(await redis.get(name)) == EST  # the first call's tokens only
            assert app.upstream.calls.call_count == 1


async def test_a_reservation_applied_but_not_acknowledged_is_settled_exactly(redis: Any) -> None:
    # before: the reserve script ran but its answer timed out; the call went on unchecked
    # (fail open) holding nothing, its settle added all it used, and the estimate Redis had
    # taken stayed in the month's counter for good
    clock = Clock(epoch(2026, 11, 10))
    name = f"{redis.test_prefix}quotas:tok:key:config:ci:2026-11"
    with TcpProxy.for_url(REDIS_URL) as proxy:
        config = through(proxy, redis)
        async with started(config, clock) as app:
            app.upstream.post(f"{OPENAI_BASE}/chat/completions").mock(side_effect=lambda _: (
                proxy.resume(), httpx.Response(200, json=answer_of_exactly_the_estimate()))[1])
            assert (await app.chat("ci", BODY)).status_code == 200  # the script is loaded
            proxy.stall()  # the next reserve is applied, its answer lost; the upstream resumes
            assert (await app.chat("ci", BODY)).status_code == 200  # unchecked (fail open)
            assert app.quotas.backend_errors == 1
            clock.now += 5
            assert (await app.chat("ci", BODY)).status_code == 200
            assert float(await redis.get(name)) == 3 * EST


async def test_a_settle_applied_but_not_acknowledged_is_counted_once(redis: Any) -> None:
    # before: the settle's add ran but its answer timed out; it was owed and added again
    # when Redis answered next (the month's counter and budgets counted the call twice)
    clock = Clock(epoch(2026, 11, 10))
    name = f"{redis.test_prefix}quotas:tok:key:config:ci:2026-11"
    usd = f"{redis.test_prefix}quotas:usd:key:config:ci:2026-11"
    with TcpProxy.for_url(REDIS_URL) as proxy:
        budgets = {"keys": {"config:ci": {"monthly_usd": 10}}}
        config = shared(redis, {"redis_retry_seconds": 5, "budgets": budgets},
                        [key("ci", monthly_limit_tokens=10_000)], url=proxy.url(REDIS_URL))
        async with started(config, clock, Cost(0.25)) as app:
            stalls = [None, proxy]  # the second call's upstream stalls Redis before its settle

            def answer(_: httpx.Request) -> httpx.Response:
                stall = stalls.pop(0) if stalls else None
                if stall is not None:
                    stall.stall()
                return httpx.Response(200, json=answer_of_exactly_the_estimate())

            app.upstream.post(f"{OPENAI_BASE}/chat/completions").mock(side_effect=answer)
            assert (await app.chat("ci", BODY)).status_code == 200
            assert (await app.chat("ci", BODY)).status_code == 200  # its settle times out
            assert app.quotas.backend_errors == 1
            assert float(await redis.get(name)) == 2 * EST  # it did go in
            proxy.resume()
            clock.now += 5
            assert (await app.chat("ci", BODY)).status_code == 200  # what is owed is paid first
            assert float(await redis.get(name)) == 3 * EST
            assert float(await redis.get(usd)) == 3 * 250_000_000


async def test_a_call_cancelled_while_its_upstream_answers_gives_the_reservation_back(redis: Any) -> None:
    # before: a shutdown cancelling a call in flight upstream left no stage to settle it (no
    # after-call, no on-error): the estimate Redis had reserved stayed in the month's counter
    clock = Clock(epoch(2026, 11, 10))
    name = f"{redis.test_prefix}quotas:tok:key:config:ci:2026-11"
    config = shared(redis, {}, [key("ci", monthly_limit_tokens=10_000)])
    async with started(config, clock) as app:
        upstream = asyncio.Event()

        async def answer_late(_: httpx.Request) -> httpx.Response:
            upstream.set()
            await asyncio.sleep(30)  # cancelled long before
            return httpx.Response(200, json=answer_of_exactly_the_estimate())

        app.upstream.post(f"{OPENAI_BASE}/chat/completions").mock(side_effect=answer_late)
        call = asyncio.create_task(app.chat("ci", BODY))
        await asyncio.wait_for(upstream.wait(), 5)
        assert float(await redis.get(name)) == EST  # reserved
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert float(await redis.get(name)) == 0  # given back
