"""Rate limits shared through a real Redis (``AIPROXY_TEST_REDIS_URL``): exact across
replicas (two started ``aiproxy serve`` processes, driven by the openai SDK), settled
tokens, and what happens when Redis goes away mid-run and comes back (TcpProxy).

Skipped only when the variable is unset; set but unreachable, these fail."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import openai
import pytest

from aiproxy.builtin.limits.gcra import Rule
from aiproxy.builtin.limits.redis_store import RedisStore
from tests.helpers import error_of, started_proxy
from tests.tcp_proxy import TcpProxy
from tests.test_limits import CHAT, PRO_KEY, estimate, limited, ratelimit

REDIS_URL = os.environ.get("AIPROXY_TEST_REDIS_URL") or ""
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="AIPROXY_TEST_REDIS_URL is not set")



async def test_replicas_sharing_redis_admit_exactly_the_limit_all_or_nothing(prefix: str) -> None:
    stores = [RedisStore(REDIS_URL) for _ in range(4)]
    key = Rule(f"{prefix}limits:key:k:r", "requests", 10, 3600.0, 1, "key 'k'")
    model = Rule(f"{prefix}limits:model:m:r", "requests", 13, 3600.0, 1, "model 'm'")
    try:
        verdicts = await asyncio.gather(*(s.take([key, model]) for s in stores for _ in range(6)))
        assert sum(v.admitted for v in verdicts) == 10
        refused = next(v for v in verdicts if not v.admitted)
        assert refused.failed == 0 and 359 < refused.wait <= 360  # T = 3600 / 10
        # the refused calls took nothing from the model: 3 of its 13 are left
        more = await asyncio.gather(*(s.take([model]) for s in stores for _ in range(2)))
        assert sum(v.admitted for v in more) == 3
        ttl = await stores[0].redis.pttl(key.key)
        assert 3_599_000 < ttl <= 3_601_000  # the counter expires when the bucket is full again
    finally:
        for s in stores:
            await s.aclose()


async def test_settling_moves_the_shared_counter(prefix: str) -> None:
    store = RedisStore(REDIS_URL)
    tpm = Rule(f"{prefix}limits:key:k:t", "tokens", 1000, 60.0, 700, "key 'k'")
    try:
        first = await store.take([tpm])
        assert first.admitted
        assert not (await store.take([tpm])).admitted
        await store.settle([tpm], 50 - 700, [first.at + first.ahead[0]])  # used 50 of 700
        verdict = await store.take([tpm])
        assert verdict.admitted and 700 * 0.06 + 50 * 0.06 - 1 < verdict.ahead[0] <= 750 * 0.06
        # more than it holds: the counter is simply full again
        await store.settle([tpm], -10_000, [verdict.at + verdict.ahead[0]])
        assert await store.redis.exists(tpm.key) == 0
        await store.settle([tpm], -5, [verdict.at + verdict.ahead[0]])  # a refund makes no key
        assert await store.redis.exists(tpm.key) == 0
    finally:
        await store.aclose()


async def test_tokens_are_settled_through_redis_in_the_gateway(prefix: str) -> None:
    redis = {"url": REDIS_URL, "prefix": prefix}
    async with limited({"tiers": {"free": {"tokens_per_minute": 1000}}}, redis=redis) as g:
        body: dict[str, Any] = {**CHAT, "max_tokens": 100, "mock": {"tokens": 20}}
        first = await g.chat(**body)
        assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - estimate(body, 100))
        used = first.json()["usage"]["total_tokens"]
        second = await g.chat(**body)
        assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - used - estimate(body, 100))
        assert g.plugin.local.tats == {}  # nothing counted in process


# ---------------------------------------------------------------- two started replicas
def _replica_config(prefix: str, limit: int) -> dict[str, Any]:
    return {
        "plugins": {"dir": None},
        "redis": {"url": REDIS_URL, "prefix": prefix},
        "providers": {"mock": {"plugin": "mock"}},
        "models": [{"name": "mock-*", "provider": "mock"}],
        "limits": {"anonymous_tier": "free", "tiers": {"free": {"requests": limit, "window_seconds": 3600}}},
    }


def test_two_started_replicas_admit_exactly_the_limit_between_them(prefix: str, tmp_path: Path) -> None:
    limit, extra = 12, 8
    config = _replica_config(prefix, limit)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with started_proxy(config, tmp_path / "a") as one, started_proxy(config, tmp_path / "b") as two:
        async def burst() -> list[tuple[int, dict[str, str]]]:
            clients = [openai.AsyncOpenAI(base_url=f"{p.url}/v1", api_key="none", max_retries=0)
                       for p in (one, two)]

            async def call(i: int) -> tuple[int, dict[str, str]]:
                client = clients[i % 2]
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="mock-gpt", messages=[{"role": "user", "content": f"call {i}"}],
                        stream=i % 3 == 0)
                except openai.RateLimitError as exc:
                    return 429, dict(exc.response.headers)
                return raw.http_response.status_code, dict(raw.headers)

            try:
                return await asyncio.gather(*(call(i) for i in range(limit + extra)))
            finally:
                for c in clients:
                    await c.close()

        answers = asyncio.run(burst())
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * limit + [429] * extra
    for status, headers in answers:
        assert headers["x-ratelimit-limit-requests"] == str(limit)
        if status == 200:  # every admitted call, streamed ones too, says what is left
            assert 0 <= int(headers["x-ratelimit-remaining-requests"]) < limit
        else:
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert int(headers["retry-after"]) == 3600 // limit
    remaining = sorted(int(h["x-ratelimit-remaining-requests"]) for s, h in answers if s == 200)
    assert remaining == list(range(limit))  # each admitted call saw its own place in the bucket


# ---------------------------------------------------------------- Redis goes away
async def test_redis_going_away_fails_open_with_a_counter_and_one_log_line(prefix: str, caplog: Any) -> None:
    with TcpProxy.for_url(REDIS_URL) as tcp:
        redis = {"url": tcp.url(REDIS_URL), "prefix": prefix}
        async with limited({"tiers": {"free": {"requests": 2}}}, redis=redis) as g:
            assert await g.statuses(3) == [200, 200, 429]
            tcp.cut()
            with caplog.at_level(logging.ERROR, logger="aiproxy.limits"):
                assert await g.statuses(5) == [200] * 5  # unchecked, not refused
                assert not ratelimit(await g.chat())
            errors = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
            assert len(errors) == 1 and "admitted without rate limits" in errors[0].getMessage()
            stats = g.plugin.aiproxy_stats() or {}
            assert stats["aiproxy_limits_backend_errors_total"] == 1  # then no round trip for a while
            assert stats["aiproxy_limits_unchecked_total"] == 6
            hooks = g.http._transport.app.state.hooks  # type: ignore[attr-defined]
            exported = hooks.sync_all("aiproxy_stats", config=None)
            assert any(s.get("aiproxy_limits_backend_errors_total") == 1 for s in exported)
            g.clock.now += 1.5  # past backend_retry_seconds: Redis is asked again, still down
            assert await g.statuses(1) == [200]
            assert (g.plugin.aiproxy_stats() or {})["aiproxy_limits_backend_errors_total"] == 2
            tcp.restore()
            g.clock.now += 1.5
            with caplog.at_level(logging.WARNING, logger="aiproxy.limits"):
                r = await g.chat()  # back: the counter in Redis is still full
            assert r.status_code == 429 and "key 'config:free'" in error_of(r)["message"]
            assert any("Redis is back" in rec.getMessage() for rec in caplog.records)
            assert (await g.chat(PRO_KEY)).status_code == 200  # tier pro has no limit here


async def test_redis_going_away_fails_closed_with_503_when_configured(prefix: str) -> None:
    with TcpProxy.for_url(REDIS_URL) as tcp:
        redis = {"url": tcp.url(REDIS_URL), "prefix": prefix}
        limits = {"tiers": {"free": {"requests": 3}}, "on_backend_error": "closed"}
        async with limited(limits, redis=redis) as g:
            assert await g.statuses(2) == [200, 200]
            tcp.cut()
            refused = await g.chat()
            assert refused.status_code == 503
            error = error_of(refused)
            assert error["code"] == "rate_limit_store_unavailable" and "Redis" in error["message"]
            assert refused.headers["retry-after"] == "1"
            assert await g.statuses(2) == [503, 503]
            assert (g.plugin.aiproxy_stats() or {})["aiproxy_limits_unavailable_total"] == 3
            tcp.restore()
            g.clock.now += 1.5
            assert await g.statuses(2) == [200, 429]  # enforced again, from where it was


async def test_a_call_that_outlasts_its_reservation_is_still_charged_what_it_used(prefix: str) -> None:
    # TPM 6000: T = 10 ms a token. The call reserves its prompt plus 20 (well under a second of
    # the bucket), so Redis expires the counter (full again) while the upstream still works
    # (1.5 s). Its real usage, 2000 tokens (20 s of the bucket), must still be charged then,
    # dated from its own take, as the in-process store does; it used to be dropped with the key.
    redis = {"url": REDIS_URL, "prefix": prefix}
    async with limited({"tiers": {"pro": {"tokens_per_minute": 6000}}}, redis=redis) as g:
        body: dict[str, Any] = {**CHAT, "max_tokens": 20}
        slow = await g.chat(PRO_KEY, **body, mock={"tokens": 2000, "latency_ms": 1500})
        assert slow.status_code == 200
        used = slow.json()["usage"]["total_tokens"]
        assert used > 2000
        after = await g.chat(PRO_KEY, **body)
        left = int(after.headers["x-ratelimit-remaining-tokens"])
        # about 6000 - used - estimate, plus what came back since the call ended: far from full
        assert left < 6000 - estimate(body, 20) - used // 2, after.headers


async def test_a_call_cancelled_while_redis_takes_its_tokens_gives_them_back(prefix: str) -> None:
    # before: a task cancelled while the take script was in flight left its token estimate
    # taken in Redis (no call.state, so no settle): the key's TPM was short by it for up to a minute
    from redis.asyncio import Redis

    with TcpProxy.for_url(REDIS_URL) as tcp:
        redis = {"url": tcp.url(REDIS_URL), "prefix": prefix}
        direct = Redis.from_url(REDIS_URL)
        async with limited({"tiers": {"free": {"tokens_per_minute": 1000}}}, redis=redis) as g:
            body: dict[str, Any] = {**CHAT, "max_tokens": 100, "mock": {"tokens": 20}}
            est = estimate(body, 100)
            first = await g.chat(**body)  # the script is loaded
            used = first.json()["usage"]["total_tokens"]
            counter = f"{prefix}limits:key:config:free:t"
            before = float(await direct.get(counter))
            tcp.stall()
            call = asyncio.create_task(g.chat(**body))
            for _ in range(200):  # bounded: until Redis has taken this call's tokens
                if float(await direct.get(counter)) > before:
                    break
                await asyncio.sleep(0.01)
            assert float(await direct.get(counter)) > before
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            tcp.resume()
            await g.plugin.finished()
            after = await g.chat(**body)
            # given back: only the first call's tokens and this one's estimate are out (plus
            # what flowed back meanwhile, well under an estimate); kept, another estimate was
            assert int(after.headers["x-ratelimit-remaining-tokens"]) >= 1000 - used - est
        await direct.aclose()


async def test_a_call_cancelled_while_its_upstream_answers_gives_its_tokens_back(prefix: str) -> None:
    # before: a shutdown cancelling a call in flight upstream left its token estimate taken
    # (no after-call, no on-error settled it): the key's TPM was short by it for up to a minute
    async with limited({"tiers": {"free": {"tokens_per_minute": 1000}}},
                       redis={"url": REDIS_URL, "prefix": prefix}) as g:
        body: dict[str, Any] = {**CHAT, "max_tokens": 100, "mock": {"tokens": 20, "latency_ms": 30_000}}
        est = estimate(body, 100)
        call = asyncio.create_task(g.chat(**body))
        for _ in range(500):  # bounded: until the call is upstream, its tokens taken
            if await g.plugin.remote.redis.get(f"{prefix}limits:key:config:free:t"):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        after = await g.chat(**{**body, "mock": {"tokens": 20}})
        # given back: only this call's estimate is out (plus a little that flowed back); kept,
        # two estimates were
        assert int(after.headers["x-ratelimit-remaining-tokens"]) >= 1000 - est - 5
