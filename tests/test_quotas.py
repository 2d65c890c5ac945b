"""Quotas and budgets in one process: month and day boundaries on an injected clock, plan
allowances by tier, budgets per key/user/tenant, a budget crossed mid-stream, what a
failed call counts, and the config errors."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from aiproxy import hookimpl, tokens
from aiproxy.call import Call
from aiproxy.config import ConfigError
from aiproxy.plugins import build_plugin_manager
from tests.conftest import make_config
from tests.helpers import error_of
from tests.quotas_support import MOCK, Clock, Cost, auth, epoch, key, quota_config, started

EST = tokens.prompt(MOCK, "mock-gpt")  # what a MOCK call reserves (it asks no max_tokens)


def used_by(r: Any) -> int:
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["total_tokens"])


async def test_a_keys_monthly_tokens_run_out_and_come_back_at_the_month_boundary() -> None:
    clock = Clock(epoch(2026, 11, 30, 23, 59))
    config = quota_config({}, [key("ci", monthly_limit_tokens=100)])
    async with started(config, clock) as app:
        used = 0
        while used + EST <= 100:
            used += used_by(await app.chat("ci"))
        refused = await app.chat("ci")
        assert refused.status_code == 429
        error = error_of(refused)
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
        assert "the monthly token limit of key config:ci is 100 tokens" in error["message"]
        assert f"{used} are used in 2026-11" in error["message"]
        assert "resets at 2026-12-01T00:00:00Z" in error["message"]
        assert refused.headers["retry-after"] == "60"
        clock.now = epoch(2026, 12, 1)  # the first instant of the next month
        assert used_by(await app.chat("ci")) > 0
        assert app.counter("tok:key:config:ci:2026-11") == used


async def test_a_request_that_asks_for_more_than_is_left_is_refused_before_it_runs() -> None:
    clock = Clock(epoch(2026, 11, 10))
    config = quota_config({}, [key("ci", monthly_limit_tokens=50)])
    async with started(config, clock) as app:
        big = await app.chat("ci", {**MOCK, "max_tokens": 60})
        assert big.status_code == 429
        assert f"may need up to {EST + 60} more" in error_of(big)["message"]
        assert used_by(await app.chat("ci", {**MOCK, "max_tokens": 20})) > 0  # fits


async def test_a_plan_allowance_is_shared_by_the_tenant_and_set_by_tier() -> None:
    clock = Clock(epoch(2026, 11, 10))
    quotas = {"plans": {"free": {"monthly_tokens": 40}, "pro": {"monthly_tokens": 1000}}}
    config = quota_config(quotas, [key("a", tenant="acme"), key("b", tenant="acme"),
                                   key("boss", tenant="acme", tier="pro"), key("c", tenant="other")])
    async with started(config, clock) as app:
        used = used_by(await app.chat("a"))
        while used + EST <= 40:
            used += used_by(await app.chat("b"))  # b spends acme's allowance, not its own
        refused = await app.chat("a")
        assert refused.status_code == 429
        assert "the free plan's monthly token allowance for tenant acme is 40 tokens" in \
            error_of(refused)["message"]
        assert (await app.chat("c")).status_code == 200  # another tenant: its own allowance
        assert (await app.chat("boss")).status_code == 200  # a pro key of acme: 1000


async def test_a_plan_per_key_counts_each_key_apart() -> None:
    clock = Clock(epoch(2026, 11, 10))
    config = quota_config({"plans": {"free": {"monthly_tokens": 20, "per": "key"}}},
                          [key("a", tenant="acme"), key("b", tenant="acme")])
    async with started(config, clock) as app:
        used_by(await app.chat("a"))
        assert error_of(await app.chat("a"))["message"].startswith(
            "Quota exceeded: the free plan's monthly token allowance for key config:a")
        assert (await app.chat("b")).status_code == 200


async def test_a_daily_key_budget_from_the_tier_and_an_explicit_one_that_replaces_it() -> None:
    clock = Clock(epoch(2026, 11, 27, 12))
    quotas = {"budgets": {"tiers": {"free": {"key": {"daily_usd": 1}}},
                          "keys": {"config:b": {"daily_usd": 0.5}}}}
    config = quota_config(quotas, [key("a"), key("b")])
    async with started(config, clock, Cost(0.4)) as app:
        assert [(await app.chat("a")).status_code for _ in range(4)] == [200, 200, 200, 429]
        refused = await app.chat("a")
        error = error_of(refused)
        assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
        assert "the daily budget of key config:a is $1.00 and $1.20 has been spent in 2026-11-27" \
            in error["message"]
        assert "resets at 2026-11-28T00:00:00Z" in error["message"]
        assert refused.headers["retry-after"] == str(12 * 3600)
        assert [(await app.chat("b")).status_code for _ in range(3)] == [200, 200, 429]
        clock.now = epoch(2026, 11, 28)
        assert (await app.chat("a")).status_code == 200


async def test_monthly_budgets_of_a_user_and_of_a_tenant_span_days() -> None:
    clock = Clock(epoch(2026, 11, 1))
    quotas = {"budgets": {"users": {"ann": {"monthly_usd": 1}},
                          "tiers": {"pro": {"tenant": {"monthly_usd": 2}}}}}
    config = quota_config(quotas, [key("a1", user="ann", tenant="acme", tier="pro"),
                                   key("a2", user="ann", tenant="acme", tier="pro"),
                                   key("bob", user="bob", tenant="acme", tier="pro")])
    async with started(config, clock, Cost(0.5)) as app:
        assert (await app.chat("a1")).status_code == 200
        clock.now = epoch(2026, 11, 15)  # another day, the same month
        assert (await app.chat("a2")).status_code == 200  # ann: $1.00 spent over two keys
        refused = await app.chat("a1")
        assert "the monthly budget of user ann is $1.00 and $1.00 has been spent in 2026-11" in \
            error_of(refused)["message"]
        assert "resets at 2026-12-01T00:00:00Z" in error_of(refused)["message"]
        assert [(await app.chat("bob")).status_code for _ in range(3)] == [200, 200, 429]
        assert "the monthly budget of tenant acme is $2.00" in error_of(await app.chat("bob"))["message"]
        clock.now = epoch(2026, 12, 1)
        assert (await app.chat("a1")).status_code == 200


async def test_a_budget_crossed_mid_stream_lets_that_stream_finish_and_refuses_the_next() -> None:
    clock = Clock(epoch(2026, 11, 27))
    config = quota_config({"budgets": {"keys": {"config:s": {"daily_usd": 1}}}}, [key("s")])
    stream = {**MOCK, "stream": True, "mock": {"tokens": 30}}
    async with started(config, clock, Cost(0.7)) as app:
        for _ in range(2):  # $0 then $0.70 spent: both start; the second takes it to $1.40
            r = await app.chat("s", stream)
            assert r.status_code == 200
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            words = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                            for e in events[:-1] if json.loads(e)["choices"])
            assert len(words.split()) == 30  # the whole answer
        refused = await app.chat("s", stream)
        assert refused.status_code == 429
        assert "$1.40 has been spent" in error_of(refused)["message"]


class SeenUsage:
    def __init__(self) -> None:
        self.totals: list[int] = []

    @hookimpl
    def aiproxy_on_error(self, call: Call) -> None:
        self.totals.append(call.usage.total_tokens if call.usage else 0)


async def test_a_failed_call_counts_what_it_used_and_a_refused_one_nothing() -> None:
    clock = Clock(epoch(2026, 11, 10))
    config = quota_config({}, [key("ci", monthly_limit_tokens=1000)])
    seen = SeenUsage()
    name = "tok:key:config:ci:2026-11"
    async with started(config, clock, seen) as app:
        cut = await app.chat("ci", {**MOCK, "stream": True, "mock": {"tokens": 40, "error_after": 10}})
        assert cut.status_code == 200 and '"error"' in cut.text  # the stream failed after 10 chunks
        assert seen.totals[-1] > EST
        assert app.counter(name) == seen.totals[-1]
        failed = await app.chat("ci", {**MOCK, "mock": {"error": 500}})  # nothing came back
        assert failed.status_code >= 500 and seen.totals[-1] == 0
        assert app.counter(name) == seen.totals[0]  # its reservation was given back


async def test_budgets_without_a_cost_stage_warn_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    config = quota_config({"budgets": {"keys": {"config:a": {"daily_usd": 1}}}}, [key("a")])
    with caplog.at_level(logging.WARNING, logger="aiproxy.quotas"):
        async with started(config, Clock(epoch(2026, 11, 10))) as app:
            assert [(await app.chat("a")).status_code for _ in range(3)] == [200] * 3  # no cost: no spend
    assert [r.message for r in caplog.records].count(
        "quotas: budgets are configured but the cost plugin is disabled (or sets no call.cost), "
        "so no spend is counted against them") == 1


async def test_count_tokens_is_neither_refused_nor_counted() -> None:
    config = quota_config({}, [key("ci", monthly_limit_tokens=20)])
    async with started(config, Clock(epoch(2026, 11, 10))) as app:
        used = 0
        while used + EST <= 20:
            used += used_by(await app.chat("ci"))
        assert (await app.chat("ci")).status_code == 429
        before = app.counter("tok:key:config:ci:2026-11")
        r = await app.http.post("/v1/messages/count_tokens", headers=auth("ci"), json={
            "model": "mock-claude", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert app.counter("tok:key:config:ci:2026-11") == before


@pytest.mark.parametrize(("section", "message"), [
    ({"plans": {"gold": {"monthly_tokens": 5}}}, "quotas.plans.gold: no tier 'gold'"),
    ({"plans": {"free": {"monthly_tokens": -1}}}, "quotas.plans.free.monthly_tokens: must be"),
    ({"plans": {"free": {"monthly_tokens": 1.5}}}, "quotas.plans.free.monthly_tokens: expected a whole"),
    ({"plans": {"free": {"per": "team"}}}, "quotas.plans.free.monthly_tokens: required"),
    ({"plans": {"free": {"monthly_tokens": 5, "per": "team"}}}, "quotas.plans.free.per: expected one of"),
    ({"budgets": {"keys": {"k1": {"daily": 1}}}},
     "quotas.budgets.keys.k1.daily: unknown setting (did you mean 'daily_usd'?)"),
    ({"budgets": {"tiers": {"pro": {"team": {"daily_usd": 1}}}}}, "quotas.budgets.tiers.pro.team: unknown"),
    ({"budgets": {"users": {"u": {"monthly_usd": "lots"}}}},
     "quotas.budgets.users.u.monthly_usd: expected a number, got 'lots'"),
    ({"budgets": {"tenants": ["t"]}}, "quotas.budgets.tenants: expected a mapping, got list"),
    ({"on_backend_error": "maybe"}, "quotas.on_backend_error: expected 'open' or 'closed'"),
    ({"flush_intervl": 3}, "quotas.flush_intervl: unknown setting (did you mean 'flush_interval'?)"),
    (["plans"], "quotas: expected a mapping, got list"),  # was read as no section: no quotas at all
    ("plans", "quotas: expected a mapping, got str"),
])
def test_a_bad_section_stops_start_up_naming_the_setting(section: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:  # reported as every config error is
        build_plugin_manager(make_config(quotas=section))
    assert message in str(raised.value)


def test_numbers_from_the_environment_are_read() -> None:
    config = make_config(quotas={"plans": {"free": {"monthly_tokens": "1000"}},
                                 "budgets": {"tiers": {"free": {"key": {"daily_usd": "2.5"}}}}})
    quotas = build_plugin_manager(config).get_plugin("quotas")
    assert quotas.settings.plans["free"].monthly_tokens == 1000
    assert quotas.settings.tier_budgets["free"]["key"].daily == 2.5


async def test_a_budget_is_counted_in_exact_cents_not_float_sums() -> None:
    # ten calls of $0.10 spend exactly $1.00: the eleventh is refused. As a float sum the
    # spend was 0.9999999999999999 < 1, and an eleventh call went through.
    clock = Clock(epoch(2026, 11, 27))
    config = quota_config({"budgets": {"keys": {"config:d": {"daily_usd": 1}}}}, [key("d")])
    async with started(config, clock, Cost(0.1)) as app:
        assert [(await app.chat("d")).status_code for _ in range(11)] == [200] * 10 + [429]
        assert "is $1.00 and $1.00 has been spent" in error_of(await app.chat("d"))["message"]


async def test_an_answer_without_usage_is_counted_from_what_was_asked_and_answered() -> None:
    # some OpenAI-compatible servers send no usage on a whole answer: it counted 0 tokens (the
    # reservation was given back whole), so a key's monthly limit was never reached
    from tests.conftest import OPENAI_BASE

    clock = Clock(epoch(2026, 11, 10))
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Name three colours."}]}
    answer = {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Red, green and blue."},
                           "finish_reason": "stop"}]}
    async with started(quota_config({}, [key("ci", monthly_limit_tokens=1000)]), clock) as app:
        app.upstream.post(f"{OPENAI_BASE}/chat/completions").respond(200, json=answer)
        r = await app.chat("ci", body)
        assert r.status_code == 200, r.text
        expected = tokens.prompt(body, "gpt-4o-mini") + tokens.completion(answer, "gpt-4o-mini")
        assert app.counter("tok:key:config:ci:2026-11") == expected
