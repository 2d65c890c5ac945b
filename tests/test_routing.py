"""Retries, fallbacks and cooldowns for whole answers, with faults injected through respx
upstreams and the mock provider; the router's clock and sleep are fake (no test sleeps)."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from aiproxy import hookimpl
from aiproxy.call import Call
from aiproxy.config import parse_config
from aiproxy.errors import ProxyError
from aiproxy.plugins import build_plugin_manager
from tests.helpers import error_of
from tests.routing_support import A_URL, B_URL, C_URL, PROVIDERS, answer, failure, pool, proxy


class Seen:
    """Records the call every after_call / on_error hook saw."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.errors: list[ProxyError] = []

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        self.calls.append(call)

    @hookimpl
    def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        self.calls.append(call)
        self.errors.append(error)


def with_seen() -> tuple[Seen, object]:
    seen = Seen()
    pm = build_plugin_manager(parse_config({"plugins": {"dir": None}, "providers": PROVIDERS}, env={}))
    pm.register(seen, name="seen")
    return seen, pm


# ---------------------------------------------------------------- each fault kind is retried

FAULTS = {
    "429": lambda: failure(429),
    "500": lambda: failure(500),
    "502": lambda: failure(502),
    "503": lambda: failure(503),
    "529": lambda: failure(529),
    "504": lambda: failure(504),
    "408": lambda: failure(408),
    "connect": httpx.ConnectError("refused"),
    "read-timeout": httpx.ReadTimeout("slow"),
    "dropped": httpx.RemoteProtocolError("peer closed connection"),
    "garbage": lambda: httpx.Response(200, content=b"<html>oops"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_each_fault_kind_is_retried_on_the_same_deployment(fault):
    async with proxy(pool("a", retries=2, backoff={"base": 0.5, "max": 4})) as p:
        first = FAULTS[fault]
        route = p.upstream.post(A_URL).mock(side_effect=[
            first() if callable(first) else first, httpx.Response(200, json=answer("second"))])
        r = await p.chat()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "second"
    assert route.call_count == 2
    assert r.headers["x-aiproxy-attempts"] == "2"
    assert r.headers["x-aiproxy-deployment"] == "a"
    assert len(p.sleeps) == 1 and 0.25 <= p.sleeps[0] <= 0.5  # backoff with jitter: base/2..base
    assert p.router.stats.retries == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_errors_and_rejected_keys_are_not_retried(status):
    async with proxy(pool("a", "b", retries=3)) as p:
        a = p.upstream.post(A_URL).mock(return_value=failure(status, message="no"))
        b = p.upstream.post(B_URL).respond(200, json=answer())
        r = await p.chat()
    assert (a.call_count, b.call_count) == (1, 0)  # round robin starts on a; nothing follows
    assert r.status_code == (502 if status in (401, 403) else status)
    if status in (401, 403):
        assert error_of(r)["code"] == "upstream_auth_failed"
    assert r.headers["x-aiproxy-attempts"] == "1"
    assert p.sleeps == []


async def test_a_retry_budget_is_spent_then_the_last_error_is_the_answer():
    async with proxy(pool("a", retries=3, backoff={"base": 1, "max": 3})) as p:
        route = p.upstream.post(A_URL).mock(return_value=failure(503, message="overloaded"))
        r = await p.chat()
    assert route.call_count == 4  # the first attempt and three retries
    assert r.status_code == 503
    error = error_of(r)
    assert error["code"] == "upstream_unavailable"
    assert error["message"].endswith("(gave up after 4 attempts)")
    assert r.headers["x-aiproxy-attempts"] == "4"
    # exponential, jittered into [ceiling/2, ceiling], capped by backoff.max
    for wait, ceiling in zip(p.sleeps, (1, 2, 3), strict=True):
        assert ceiling / 2 <= wait <= ceiling
    assert p.router.stats.exhausted == 1


async def test_without_retries_a_single_deployment_is_tried_once():
    async with proxy(pool("a")) as p:
        route = p.upstream.post(A_URL).mock(return_value=failure(503))
        r = await p.chat()
    assert r.status_code == 503 and route.call_count == 1 and p.sleeps == []


# ---------------------------------------------------------------- retry-after

async def test_retry_after_seconds_is_waited_when_longer_than_the_backoff():
    async with proxy(pool("a", retries=1, backoff={"base": 0.1, "max": 0.1})) as p:
        p.upstream.post(A_URL).mock(side_effect=[failure(429, {"retry-after": "7"}),
                                                 httpx.Response(200, json=answer())])
        r = await p.chat()
    assert r.status_code == 200
    assert p.sleeps == [7.0]


async def test_retry_after_as_an_http_date_and_in_milliseconds():
    when = email.utils.format_datetime(
        email.utils.localtime().astimezone(__import__("datetime").timezone.utc)
        + __import__("datetime").timedelta(seconds=30), usegmt=True)
    async with proxy(pool("a", retries=2, backoff={"base": 0, "max": 0})) as p:
        p.upstream.post(A_URL).mock(side_effect=[failure(429, {"retry-after": when}),
                                                 failure(503, {"retry-after-ms": "1500"}),
                                                 httpx.Response(200, json=answer())])
        r = await p.chat()
    assert r.status_code == 200
    assert 28 <= p.sleeps[0] <= 30
    assert p.sleeps[1] == 1.5


async def test_retry_after_past_the_deadline_returns_the_429_with_it():
    async with proxy(pool("a", retries=3, deadline=10)) as p:
        route = p.upstream.post(A_URL).mock(return_value=failure(429, {"retry-after": "60"}, "slow down"))
        r = await p.chat()
    assert route.call_count == 1
    assert p.sleeps == []
    assert r.status_code == 429
    assert r.headers["retry-after"] == "60"
    assert error_of(r)["type"] == "rate_limit_error"


async def test_the_deadline_bounds_the_retries():
    async with proxy(pool("a", retries=10, deadline=5, backoff={"base": 2, "max": 2})) as p:
        route = p.upstream.post(A_URL).mock(return_value=failure(502))
        r = await p.chat()
    assert r.status_code == 502
    assert sum(p.sleeps) < 5
    assert 2 <= route.call_count <= 5  # waits of 1..2 s: between two and four of them fit


# ---------------------------------------------------------------- pools and fallbacks

async def test_a_pool_fails_over_to_another_deployment_at_once():
    seen, pm = with_seen()
    async with proxy(pool("a", "b", strategy="round_robin"), plugin_manager=pm) as p:
        a = p.upstream.post(A_URL).mock(return_value=failure(503))
        b = p.upstream.post(B_URL).respond(200, json=answer("from b"))
        answers = [await p.chat() for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 200]
    assert p.sleeps == []  # another deployment: no backoff needed
    assert a.call_count == 1 and b.call_count == 2  # the second call's turn started on b
    assert answers[0].headers["x-aiproxy-deployment"] == "b"
    attempts = seen.calls[0].metadata["attempts"]
    assert [(x["deployment"], x["status"]) for x in attempts] == [("a", 503), ("b", 200)]
    assert attempts[0]["code"] == "upstream_unavailable"
    assert all(isinstance(x["latency_ms"], float) for x in attempts)
    assert seen.calls[0].metadata["deployment"] == "b"
    assert seen.calls[0].attempts == 2


async def test_fallbacks_are_tried_in_order_when_the_pool_is_exhausted():
    seen, pm = with_seen()
    models = [*pool("a", retries=1, fallbacks=["second", "third"]),
              *pool("b", name="second"), *pool("c", name="third")]
    async with proxy(models, plugin_manager=pm) as p:
        a = p.upstream.post(A_URL).mock(return_value=failure(500))
        b = p.upstream.post(B_URL).mock(return_value=failure(529))
        c = p.upstream.post(C_URL).respond(200, json=answer("third"))
        r = await p.chat()
    assert r.status_code == 200 and r.headers["x-aiproxy-deployment"] == "c"
    assert (a.call_count, b.call_count, c.call_count) == (2, 1, 1)
    sent = [req.content for req in (a.calls[0].request, b.calls[0].request, c.calls[0].request)]
    assert [b'"model":"up-a"' in sent[0], b'"model":"up-b"' in sent[1], b'"model":"up-c"' in sent[2]] \
        == [True, True, True]
    call = seen.calls[0]
    assert [x["deployment"] for x in call.metadata["attempts"]] == ["a", "a", "b", "c"]
    assert call.metadata["fallback"] == "third"
    assert call.model == "chat"  # what the client asked for is kept
    assert p.router.stats.fallbacks == 2


async def test_when_every_fallback_fails_the_client_gets_the_last_error():
    models = [*pool("a", fallbacks=["second"]), *pool("b", name="second")]
    async with proxy(models) as p:
        p.upstream.post(A_URL).mock(return_value=failure(503))
        p.upstream.post(B_URL).mock(side_effect=httpx.ConnectError("refused"))
        r = await p.chat()
    assert r.status_code == 502
    error = error_of(r)
    assert error["code"] == "upstream_connect_error"
    assert r.headers["x-aiproxy-attempts"] == "2"
    assert "sk-" not in r.text


async def test_context_window_and_content_policy_fallbacks():
    models = [*pool("a", context_window_fallbacks=["big"], content_policy_fallbacks=["lenient"]),
              *pool("b", name="big"), *pool("c", name="lenient")]
    async with proxy(models) as p:
        p.upstream.post(A_URL).mock(side_effect=[
            failure(400, message="This model's maximum context length is 8192 tokens",
                    code="context_length_exceeded"),
            failure(400, message="Your request was rejected by our content policy",
                    code="content_policy_violation"),
            failure(400, message="Invalid value for 'temperature'")])
        p.upstream.post(B_URL).respond(200, json=answer("big"))
        p.upstream.post(C_URL).respond(200, json=answer("lenient"))
        too_long, refused, invalid = [await p.chat() for _ in range(3)]
    assert too_long.headers["x-aiproxy-deployment"] == "b"
    assert refused.headers["x-aiproxy-deployment"] == "c"
    assert invalid.status_code == 400  # an ordinary bad request goes nowhere else


async def test_a_client_error_from_a_fallback_does_not_loop():
    models = [*pool("a", context_window_fallbacks=["big"]), *pool("b", name="big")]
    async with proxy(models) as p:
        too_long = failure(400, message="maximum context length exceeded", code="context_length_exceeded")
        a = p.upstream.post(A_URL).mock(return_value=too_long)
        b = p.upstream.post(B_URL).mock(return_value=too_long)
        r = await p.chat()
    assert r.status_code == 400 and (a.call_count, b.call_count) == (1, 1)


# ---------------------------------------------------------------- cooldowns

async def test_a_failing_deployment_cools_down_and_is_probed_back_in():
    models = pool("a", "b", strategy="round_robin", cooldown={"failures": 2, "window": 60, "duration": 30})
    async with proxy(models) as p:
        healthy = {"a": False}

        def a_answer(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json=answer("a")) if healthy["a"] else failure(503)

        a = p.upstream.post(A_URL).mock(side_effect=a_answer)
        p.upstream.post(B_URL).respond(200, json=answer("b"))
        for _ in range(4):  # a fails twice (on its turns) and is taken out
            assert (await p.chat()).status_code == 200
        assert a.call_count == 2 and p.router.breaker.cooling("a") == 30
        assert p.router.stats.cooldowns == 1
        for _ in range(4):  # cooling: every call goes straight to b
            assert (await p.chat()).headers["x-aiproxy-deployment"] == "b"
        assert a.call_count == 2
        p.clock.now += 31  # the cooldown is over: a is probed again; it fails: out again at once
        for _ in range(2):
            await p.chat()
        assert a.call_count == 3 and p.router.breaker.cooling("a") > 0
        p.clock.now += 31
        healthy["a"] = True  # recovered: the probe succeeds, a takes its turns again
        served = [(await p.chat()).headers["x-aiproxy-deployment"] for _ in range(4)]
    assert served.count("a") == 2
    assert p.router.breaker.cooling("a") == 0 and not p.router.breaker.troubled("a")


async def test_when_everything_cools_the_soonest_back_is_still_tried():
    models = pool("a", "b", cooldown={"failures": 1, "window": 60, "duration": 30})
    async with proxy(models) as p:
        a = p.upstream.post(A_URL).mock(return_value=failure(503))
        b = p.upstream.post(B_URL).mock(return_value=failure(503))
        r = await p.chat()
        assert r.status_code == 503 and a.call_count + b.call_count == 2
        p.clock.now += 1
        b.mock(return_value=httpx.Response(200, json=answer()))
        a.mock(return_value=httpx.Response(200, json=answer()))
        r = await p.chat()  # a cooling breaker never turns a call away on its own
    assert r.status_code == 200


async def test_a_pool_that_is_all_cooling_goes_straight_to_its_fallback():
    models = [*pool("a", fallbacks=["backup"], cooldown={"failures": 1, "window": 60, "duration": 30}),
              *pool("b", name="backup")]
    async with proxy(models) as p:
        a = p.upstream.post(A_URL).mock(return_value=failure(503))
        p.upstream.post(B_URL).respond(200, json=answer("backup"))
        assert (await p.chat()).status_code == 200
        assert (await p.chat()).status_code == 200
    assert a.call_count == 1


# ---------------------------------------------------------------- strategies and A/B

async def test_weighted_split_records_its_arm():
    seen, pm = with_seen()
    models = [{"name": "chat", "provider": "a", "id": "arm-a", "weight": 80},
              {"name": "chat", "provider": "b", "id": "arm-b", "weight": 20}]
    async with proxy(models, plugin_manager=pm) as p:
        p.router.rng.seed(7)
        p.upstream.post(A_URL).respond(200, json=answer())
        p.upstream.post(B_URL).respond(200, json=answer())
        served = [(await p.chat()).headers["x-aiproxy-deployment"] for _ in range(200)]
    assert 140 <= served.count("arm-a") <= 180
    assert [c.metadata["arm"] for c in seen.calls] == served


async def test_route_rules_send_callers_by_tier_tenant_and_user():
    from aiproxy.call import Principal

    class Auth:
        @hookimpl
        def aiproxy_authenticate(self, call: Call) -> Principal:
            h = call.headers
            return Principal(id="k", tier=h.get("x-tier"), tenant=h.get("x-tenant"), user=h.get("x-user"))

    cfg = parse_config({"plugins": {"dir": None}, "providers": PROVIDERS}, env={})
    pm = build_plugin_manager(cfg)
    pm.register(Auth(), name="test_auth")
    models = [{"name": "chat", "provider": "a", "id": "default"},
              {"name": "chat", "provider": "b", "id": "premium", "route": {"tier": ["pro", "enterprise"]}},
              {"name": "chat", "provider": "c", "id": "beta", "route": {"user": ["ann"], "tenant": "acme"}}]
    async with proxy(models, plugin_manager=pm) as p:
        for url in (A_URL, B_URL, C_URL):
            p.upstream.post(url).respond(200, json=answer())

        async def who(**headers: str) -> str:
            r = await p.http.post("/v1/chat/completions", json={"model": "chat", "messages": [
                {"role": "user", "content": "x"}]}, headers=headers)
            return r.headers["x-aiproxy-deployment"]

        assert await who(**{"x-tier": "free"}) == "default"
        assert await who(**{"x-tier": "pro"}) == "premium"
        assert await who(**{"x-user": "ann", "x-tenant": "acme"}) == "beta"
        assert await who(**{"x-user": "ann", "x-tenant": "other"}) == "default"


async def test_least_busy_and_latency_strategies():
    async with proxy(pool("a", "b", strategy="least_busy")) as p:
        busy = p.router.pool("chat").deployments[0]
        busy.in_flight = 3
        p.upstream.post(A_URL).respond(200, json=answer())
        p.upstream.post(B_URL).respond(200, json=answer())
        assert {(await p.chat()).headers["x-aiproxy-deployment"] for _ in range(3)} == {"b"}
    async with proxy(pool("a", "b", strategy="latency")) as p:
        def slow(seconds: float, text: str):
            def respond(request: httpx.Request) -> httpx.Response:
                p.clock.now += seconds
                return httpx.Response(200, json=answer(text))
            return respond
        p.upstream.post(A_URL).mock(side_effect=slow(2.0, "a"))
        p.upstream.post(B_URL).mock(side_effect=slow(0.2, "b"))
        served = [(await p.chat()).headers["x-aiproxy-deployment"] for _ in range(6)]
    assert sorted(served[:2]) == ["a", "b"]  # each measured once
    assert served[2:] == ["b"] * 4
    assert p.router.pool("chat").deployments[1].latency == pytest.approx(0.2)


# ---------------------------------------------------------------- mock-provider faults

async def test_mock_error_rate_is_absorbed_by_retries():
    models = [{"name": "chat", "provider": "mock", "retries": 4, "backoff": {"base": 0.01, "max": 0.01},
               "options": {"error": 503, "error_rate": 0.3}}]
    async with proxy(models) as p:
        answers = [await p.chat() for _ in range(60)]
    assert all(r.status_code == 200 for r in answers)
    assert p.router.stats.retries > 0
    assert p.router.stats.attempts == 60 + p.router.stats.retries


async def test_a_mock_529_per_request_is_retried_then_reported():
    async with proxy([{"name": "chat", "provider": "mock", "retries": 1}]) as p:
        r = await p.chat(mock={"error": 529, "retry_after": 2})
    assert r.status_code == 503 and p.sleeps == [2.0]
    assert error_of(r)["code"] == "upstream_unavailable"
    assert r.headers["x-aiproxy-attempts"] == "2"


async def test_a_deployment_is_named_by_provider_model_and_place_never_by_its_key():
    models = [{"name": "chat", "provider": "a", "model": "up-a"}, {"name": "chat", "provider": "b"}]
    async with proxy(models) as p:
        p.upstream.post(A_URL).mock(return_value=failure(503, message="key sk-a-secret-1111 is bad"))
        p.upstream.post(B_URL).respond(200, json=answer())
        ok = await p.chat()
        p.upstream.post(B_URL).mock(return_value=failure(502))
        bad = await p.chat()
    assert ok.headers["x-aiproxy-deployment"] == "b/chat#1"
    assert [d.id for d in p.router.pool("chat").deployments] == ["a/up-a#0", "b/chat#1"]
    for r in (ok, bad):
        assert "secret" not in r.text and not any("secret" in v for v in r.headers.values())
    assert bad.headers["x-aiproxy-attempts"] == "2"


async def test_a_success_clears_the_failures_of_a_single_deployment_too():
    async with proxy(pool("a", retries=1, cooldown={"failures": 3, "window": 60, "duration": 30})) as p:
        p.upstream.post(A_URL).mock(side_effect=[
            failure(503), httpx.Response(200, json=answer()),
            failure(503), httpx.Response(200, json=answer()),
            failure(503), httpx.Response(200, json=answer())])
        for _ in range(3):
            assert (await p.chat()).status_code == 200
    # each failure was followed by a success: never three in a row, never cooled down
    assert p.router.stats.cooldowns == 0 and not p.router.breaker.troubled("a")


async def test_a_cooling_pool_whose_fallbacks_are_all_unavailable_still_tries_itself():
    providers = {**PROVIDERS, "off": {"plugin": "openai", "api_base": "https://off.test/v1"}}  # no key
    models = [*pool("a", fallbacks=["gone"], cooldown={"failures": 1, "window": 60, "duration": 30}),
              {"name": "gone", "provider": "off"}]
    async with proxy(models, providers=providers) as p:
        a = p.upstream.post(A_URL).mock(side_effect=[failure(503), httpx.Response(200, json=answer())])
        assert (await p.chat()).status_code == 503  # a fails and cools; "gone" cannot serve
        assert p.router.breaker.cooling("a") > 0
        r = await p.chat()
    assert r.status_code == 200 and a.call_count == 2
    assert p.router.stats.fallbacks == 0
