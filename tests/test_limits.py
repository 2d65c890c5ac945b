"""The rate-limit stage in a real gateway (in process, mock upstream, injected clock): tiers,
per-key and per-model limits, token estimates settled with real usage, headers, 429s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from aiproxy import tokens
from aiproxy.app import create_app
from aiproxy.builtin.limits import Limits
from tests.conftest import make_config
from tests.helpers import error_of

FREE_KEY = "sk-limits-free-" + "f" * 20
PRO_KEY = "sk-limits-pro-" + "p" * 20
OWN_KEY = "sk-limits-own-" + "o" * 20
MATE_KEY = "sk-limits-mate-" + "m" * 20
MASTER = "sk-master-" + "x" * 20
DECLARED = [
    {"name": "free", "key": FREE_KEY, "tier": "free", "tenant": "acme", "user": "ann"},
    {"name": "pro", "key": PRO_KEY, "tier": "pro"},
    {"name": "own", "key": OWN_KEY, "tier": "free", "metadata": {"rate_limits": {"requests": 5}}},
    {"name": "mate", "key": MATE_KEY, "tier": "pro", "tenant": "acme", "user": "bob"},
]
TIERS = {"free": {"requests": 3}, "pro": {"requests": 10}}
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hi to the rate limiter"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Gateway:
    http: httpx.AsyncClient
    plugin: Limits
    clock: Clock

    async def chat(self, key: str | None = FREE_KEY, **body: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return await self.http.post("/v1/chat/completions", json={**CHAT, **body}, headers=headers)

    async def statuses(self, n: int, key: str | None = FREE_KEY, **body: Any) -> list[int]:
        return [(await self.chat(key, **body)).status_code for _ in range(n)]


@asynccontextmanager
async def limited(limits: dict[str, Any], **sections: Any) -> AsyncIterator[Gateway]:
    sections.setdefault("keys", {"declared": DECLARED})
    config = make_config(limits=limits, **sections)
    app = create_app(config)
    plugin = app.state.plugin_manager.get_plugin("limits")
    clock = Clock()
    plugin.clock = plugin.local.clock = clock
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as http:
            yield Gateway(http, plugin, clock)


def ratelimit(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-")}


async def test_each_tier_admits_its_own_limit_per_key() -> None:
    async with limited({"tiers": TIERS, "scopes": ["key"]}) as g:
        assert await g.statuses(5, FREE_KEY) == [200, 200, 200, 429, 429]
        assert (await g.statuses(12, PRO_KEY)).count(200) == 10
        assert await g.statuses(7, OWN_KEY) == [200] * 5 + [429] * 2  # its metadata's 5, not free's 3


async def test_concurrent_calls_admit_exactly_the_limit() -> None:
    async with limited({"tiers": {"free": {"requests": 7}}}) as g:
        answers = await asyncio.gather(*(g.chat(FREE_KEY) for _ in range(12)))
        assert sorted(r.status_code for r in answers) == [200] * 7 + [429] * 5


async def test_a_refusal_names_the_limit_and_when_to_retry() -> None:
    async with limited({"tiers": {"free": {"requests": 4, "window_seconds": 60}}}) as g:
        await g.statuses(4)
        r = await g.chat()
        assert r.status_code == 429
        error = error_of(r)
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert error["message"] == ("Rate limit reached for key 'config:free' (tier free): 4 requests per "
                                    "1m0s. Retry in 15s.")
        assert r.headers["retry-after"] == "15" and r.headers["retry-after-ms"] == "15000"
        assert ratelimit(r) == {"x-ratelimit-limit-requests": "4", "x-ratelimit-remaining-requests": "0",
                                "x-ratelimit-reset-requests": "1m0s"}
        g.clock.now += 15  # one slot back after T = 60 / 4 seconds: not the whole window
        assert await g.statuses(2) == [200, 429]


async def test_the_window_slides_instead_of_resetting() -> None:
    async with limited({"tiers": {"free": {"requests": 6, "window_seconds": 60}}}) as g:
        g.clock.now += 59.9  # just before where a fixed window would reset
        assert await g.statuses(6) == [200] * 6
        g.clock.now += 0.2
        assert await g.statuses(6) == [429] * 6  # a fixed window would let six more through here
        g.clock.now += 20  # capacity returns gradually: 2 of 6 after a third of the window
        assert (await g.statuses(6)).count(200) == 2


async def test_every_successful_call_carries_the_headers_whole_and_streamed() -> None:
    async with limited({"tiers": {"free": {"requests": 4, "window_seconds": 60}}}) as g:
        whole = await g.chat()
        assert ratelimit(whole) == {"x-ratelimit-limit-requests": "4", "x-ratelimit-remaining-requests": "3",
                                    "x-ratelimit-reset-requests": "15s"}
        stream = await g.chat(stream=True)
        assert stream.status_code == 200 and "data: [DONE]" in stream.text
        assert ratelimit(stream) == {"x-ratelimit-limit-requests": "4",
                                     "x-ratelimit-remaining-requests": "2",
                                     "x-ratelimit-reset-requests": "30s"}


async def test_the_tightest_of_key_user_tenant_and_model_is_reported_and_enforced() -> None:
    limits = {"tiers": TIERS, "models": {"mock-gpt": {"requests": 8, "window_seconds": 3600}}}
    async with limited(limits) as g:
        r = await g.chat(MATE_KEY)  # pro key (10) of tenant acme (tier pro: 10); model 8
        assert r.headers["x-ratelimit-limit-requests"] == "8"
        assert r.headers["x-ratelimit-remaining-requests"] == "7"
        # a user's or tenant's counter is charged at the calling key's tier: the pro call took
        # 1/10 of tenant acme's window, so the free key (3 per window) finds room for 2 more
        assert await g.statuses(3, FREE_KEY) == [200, 200, 429]
        assert "tenant 'acme' (tier free)" in error_of(await g.chat(FREE_KEY))["message"]
        r = await g.chat(MATE_KEY)  # tenant acme: 1/10 + 2/3 + 1/10 used: 1 pro call left of 10
        assert r.headers["x-ratelimit-limit-requests"] == "10"
        assert r.headers["x-ratelimit-remaining-requests"] == "1"
        assert await g.statuses(5, PRO_KEY) == [200, 200, 200, 200, 429]  # the model's 8 are gone
        r = await g.chat(MATE_KEY)
        assert r.status_code == 429 and "model 'mock-gpt'" in error_of(r)["message"]
        other = await g.chat(MATE_KEY, model="mock-claude")  # the model limit is mock-gpt's only
        assert other.status_code == 200


async def test_a_tier_can_have_its_own_limits_on_one_model() -> None:
    limits = {"tiers": TIERS, "scopes": ["key"], "models": {"mock-gpt": {"tiers": {"free": {"requests": 2}}}}}
    async with limited(limits) as g:
        assert await g.statuses(3, FREE_KEY) == [200, 200, 429]
        r = await g.chat(FREE_KEY)
        assert "key 'config:free' on model 'mock-gpt' (tier free): 2 requests per 1h0m0s" \
            in error_of(r)["message"]
        # the tier's own 3 still count across models: 2 taken on mock-gpt, 1 left elsewhere
        assert await g.statuses(2, FREE_KEY, model="mock-claude") == [200, 429]
        assert await g.statuses(3, PRO_KEY) == [200] * 3  # the pro tier has no row for mock-gpt


async def test_a_tenant_limit_counts_every_key_of_the_tenant() -> None:
    async with limited({"tiers": {"free": {"requests": 3}, "pro": {"requests": 3}},
                        "scopes": ["tenant"]}) as g:
        assert await g.statuses(2, MATE_KEY) == [200, 200]  # two keys of tenant acme: 3 in all
        assert await g.statuses(2, FREE_KEY) == [200, 429]
        r = await g.chat(FREE_KEY)
        assert "tenant 'acme' (tier free)" in error_of(r)["message"]
        assert await g.statuses(4, PRO_KEY) == [200] * 4  # no tenant, and only tenants are limited


async def test_the_master_key_and_count_tokens_are_never_limited() -> None:
    async with limited({"tiers": {"free": {"requests": 1}}, "anonymous_tier": "free"},
                       server={"master_key": MASTER}) as g:
        assert await g.statuses(4, MASTER) == [200] * 4
        assert "x-ratelimit-limit-requests" not in (await g.chat(MASTER)).headers
        for _ in range(3):
            counted = await g.http.post("/v1/messages/count_tokens", headers={"x-api-key": FREE_KEY},
                                        json={"model": "mock-gpt", "messages": [{"role": "user",
                                                                                 "content": "hi"}]})
            assert counted.status_code == 200, counted.text
        assert await g.statuses(2, FREE_KEY) == [200, 429]  # its one call was still there


async def test_callers_without_a_key_are_limited_only_when_a_tier_is_named_for_them() -> None:
    async with limited({"tiers": {"free": {"requests": 2}}}) as g:
        assert await g.statuses(4, None) == [200] * 4
    async with limited({"tiers": {"free": {"requests": 2}}, "anonymous_tier": "free"}) as g:
        assert await g.statuses(3, None) == [200, 200, 429]
        assert "callers without a key (tier free)" in error_of(await g.chat(None))["message"]


async def test_no_limits_section_means_no_headers_and_no_state() -> None:
    async with limited({}) as g:
        r = await g.chat()
        assert r.status_code == 200 and not ratelimit(r)
        assert g.plugin.local.tats == {}


# ---------------------------------------------------------------- tokens per minute
def estimate(body: dict[str, Any], max_tokens: int) -> int:
    return tokens.prompt(body, "mock-gpt") + max_tokens


async def test_tokens_are_estimated_before_and_settled_with_real_usage_after() -> None:
    async with limited({"tiers": {"free": {"tokens_per_minute": 1000}}}) as g:
        body: dict[str, Any] = {**CHAT, "max_tokens": 100, "mock": {"tokens": 20}}
        first = await g.chat(**body)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - estimate(body, 100))
        used = first.json()["usage"]["total_tokens"]
        assert used < estimate(body, 100)
        second = await g.chat(**body)  # the first now counts what it used, not its estimate
        assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - used - estimate(body, 100))
        assert "x-ratelimit-limit-requests" not in second.headers  # no request limit in this tier


async def test_a_stream_settles_with_its_usage_too() -> None:
    async with limited({"tiers": {"free": {"tokens_per_minute": 1000}}}) as g:
        body: dict[str, Any] = {**CHAT, "max_tokens": 300, "mock": {"tokens": 10}, "stream": True,
                "stream_options": {"include_usage": True}}
        first = await g.chat(**body)
        assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - estimate(body, 300))
        used = [line for line in first.text.splitlines() if '"usage":{' in line]
        assert used, first.text
        total = int(used[-1].split('"total_tokens":')[1].split("}")[0].split(",")[0])
        second = await g.chat(**body)
        assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - total - estimate(body, 300))


async def test_a_failed_call_gives_its_estimate_back() -> None:
    async with limited({"tiers": {"free": {"tokens_per_minute": 1000}}}) as g:
        body: dict[str, Any] = {**CHAT, "max_tokens": 400}
        failed = await g.chat(**body, mock={"error": 400})
        assert failed.status_code == 400
        ok = await g.chat(**body)
        assert ok.headers["x-ratelimit-remaining-tokens"] == str(1000 - estimate(body, 400))


async def test_a_request_larger_than_the_token_limit_is_told_so() -> None:
    async with limited({"tiers": {"free": {"tokens_per_minute": 500}}}) as g:
        r = await g.chat(max_tokens=600)
        assert r.status_code == 429
        error = error_of(r)
        assert error["code"] == "request_too_large" and "limit of 500 tokens per minute" in error["message"]
        assert "retry-after" not in r.headers


async def test_tokens_per_minute_refuses_until_enough_has_come_back() -> None:
    async with limited({"models": {"mock-gpt": {"tokens_per_minute": 600}}}) as g:
        body: dict[str, Any] = {**CHAT, "max_tokens": 250}
        need = estimate(body, 250)
        held = await asyncio.gather(*(g.chat(PRO_KEY, **body, mock={"latency_ms": 50}) for _ in range(3)))
        assert sorted(r.status_code for r in held) == [200, 200, 429]  # two estimates fit in 600
        refused = next(r for r in held if r.status_code == 429)
        assert f"model 'mock-gpt': 600 tokens per minute, and this request needs about {need}" \
            in error_of(refused)["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert (await g.chat(PRO_KEY, **body)).status_code == 200  # settled: real usage is small


# ---------------------------------------------------------------- per-key overrides
async def test_a_key_override_from_the_key_store_applies_to_that_key_only(migrated_url: str) -> None:
    from aiproxy.storage.keys import KeyStore

    limits = {"tiers": {"free": {"requests": 2}}}
    async with limited(limits, database={"url": migrated_url, "migrate_on_start": False},
                       keys={"required": True}) as g:
        store: KeyStore = g.http._transport.app.state.key_store  # type: ignore[attr-defined]
        plain, _ = await store.create_key(name="plain", tier="free")
        boosted, record = await store.create_key(name="boosted", tier="free",
                                                 metadata={"rate_limits": {"requests": 4,
                                                                           "window_seconds": 60}})
        assert await g.statuses(3, plain) == [200, 200, 429]
        r = await g.chat(boosted)
        assert r.headers["x-ratelimit-limit-requests"] == "4"
        assert r.headers["x-ratelimit-reset-requests"] == "15s"
        assert await g.statuses(4, boosted) == [200, 200, 200, 429]
        assert f"key '{record.id}'" in error_of(await g.chat(boosted))["message"]
