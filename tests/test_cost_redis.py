"""The cost stage's spend totals on a real Redis (``AIPROXY_TEST_REDIS_URL``) when Redis
misbehaves between applying a write and acknowledging it: every nano-dollar is counted
exactly once, and the alert for a tenant that crossed is sent once."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from aiproxy.builtin.cost.alerts import _MARK, Spend
from aiproxy.builtin.cost.notifiers import Notifiers
from tests.redis_support import REDIS_URL, needs_redis
from tests.tcp_proxy import TcpProxy

pytestmark = needs_redis
NOV = dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def direct() -> AsyncIterator[Any]:
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def spend_through(proxy: TcpProxy, prefix: str, threshold: str = "100") -> Spend:
    spend = Spend(Decimal(threshold), Notifiers([], [], None), redis_url=proxy.url(REDIS_URL),
                  prefix=prefix, flush_interval=3600)
    spend.now = lambda: NOV
    return spend


async def total(direct: Any, prefix: str, tenant: str) -> int:
    return int(await direct.get(f"{prefix}cost:spend:2026-11:{tenant}") or 0)


async def test_a_flush_applied_but_not_acknowledged_is_counted_once(prefix: str, direct: Any) -> None:
    # before: the INCRBY pipeline timed out after Redis had applied it, the batch was put
    # back in pending, and the next flush added it again (the tenant paid twice)
    with TcpProxy.for_url(REDIS_URL) as proxy:
        spend = spend_through(proxy, prefix)
        try:
            spend.add("acme", 1_250_000)
            await spend.flush()  # connected, and the applied-mark exists from here on
            spend.add("acme", 2_000_000)
            spend.add("globex", 500_000)
            proxy.stall()
            await spend.flush()  # applied by Redis; the reply never comes: a timeout
            assert spend.stats.backend_errors == 1
            assert await total(direct, prefix, "acme") == 3_250_000  # it did go in
            spend.add("acme", 1_000)  # spent while the batch's fate is unknown
            proxy.resume()
            await spend.flush()
            await spend.flush()
            assert await total(direct, prefix, "acme") == 3_251_000
            assert await total(direct, prefix, "globex") == 500_000
        finally:
            await spend.aclose()


async def test_a_flush_refused_outright_is_applied_once_when_redis_is_back(prefix: str,
                                                                           direct: Any) -> None:
    with TcpProxy.for_url(REDIS_URL) as proxy:
        spend = spend_through(proxy, prefix)
        try:
            proxy.cut()
            spend.add("acme", 7)
            await spend.flush()
            spend.add("acme", 5)
            await spend.flush()
            assert spend.stats.backend_errors == 2
            proxy.restore()
            await spend.flush()
            await spend.flush()
            assert await total(direct, prefix, "acme") == 12
        finally:
            await spend.aclose()


async def test_an_alert_mark_set_but_not_acknowledged_still_sends_the_alert(prefix: str) -> None:
    # before: the SET NX of the mark went through but its answer was lost; the next flush's
    # SET NX found the mark taken (by this very replica) and nobody ever sent the alert
    from tests.test_cost_alerts import Webhook

    async with Webhook() as hook:
        with TcpProxy.for_url(REDIS_URL) as proxy:
            spend = Spend(Decimal("0.001"), Notifiers([hook.url], [], None),
                          redis_url=proxy.url(REDIS_URL), prefix=prefix, flush_interval=3600)
            spend.now = lambda: NOV
            mark = spend._mark_script
            stalls = [proxy]

            async def mark_unanswered_once(*args: Any, **kwargs: Any) -> Any:
                if not stalls:
                    return await mark(*args, **kwargs)
                stalls.pop().stall()
                try:
                    return await mark(*args, **kwargs)
                finally:
                    proxy.resume()

            spend._mark_script = mark_unanswered_once
            try:
                await spend.redis.script_load(_MARK)  # else the stalled EVALSHA runs nothing (NOSCRIPT)
                spend.add("acme", 1_250_000)  # $0.00125: past the threshold
                await spend.flush()
                assert spend.stats.backend_errors == 1 and hook.bodies == []
                await spend.flush()
                await spend.flush()
                await spend.settled()
                assert [(b["tenant"], b["spend_usd"]) for b in hook.bodies] == [("acme", "0.00125")]
            finally:
                await spend.aclose()
