"""The routing knobs in YAML (errors named by path), retryability, retry-after parsing,
backoff, and the in-process breaker driven by a fake clock."""

from __future__ import annotations

import random

import pytest

from aiproxy.config import ConfigError, parse_config
from aiproxy.errors import ProxyError
from aiproxy.routing import policy
from aiproxy.routing.breaker import LocalBreaker
from aiproxy.routing.settings import Cooldown, pool_settings
from tests.routing_support import PROVIDERS, FakeClock


def parse(models):
    return parse_config({"plugins": {"dir": None}, "providers": PROVIDERS, "models": models}, env={})


def errors_of(models) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(models)
    return info.value.errors


def test_a_pool_with_every_knob():
    cfg = parse([
        {"name": "chat", "provider": "a", "id": "a-eu", "weight": 3, "strategy": "weighted", "retries": 4,
         "deadline": 20, "backoff": {"base": 0.2, "max": 5}, "fallbacks": ["small"],
         "context_window_fallbacks": ["big"], "content_policy_fallbacks": ["small"],
         "cooldown": {"failures": 2, "window": 10, "duration": 15},
         "timeout": {"connect": 1, "first_token": 4, "idle": 9, "total": 120},
         "route": {"tier": ["pro", "enterprise"], "tenant": "acme"}},
        {"name": "chat", "provider": "b", "weight": 1},
        {"name": "small", "provider": "mock"},
        {"name": "big", "provider": "mock"},
    ])
    first, second = cfg.models[:2]
    assert first.routing.id == "a-eu" and first.routing.weight == 3
    assert first.routing.route == {"tier": frozenset({"pro", "enterprise"}), "tenant": frozenset({"acme"})}
    assert (first.timeout.first_token, first.timeout.idle, first.timeout.total) == (4, 9, 120)
    s = pool_settings([first.routing, second.routing])
    assert (s.strategy, s.retries, s.deadline, s.backoff_base, s.backoff_max) == ("weighted", 4, 20, 0.2, 5)
    assert s.fallbacks == ("small",) and s.context_window_fallbacks == ("big",)
    assert s.cooldown == Cooldown(2, 10, 15)
    assert first.extra == {}  # routing knobs are not left for stage plugins


def test_defaults_weights_imply_weighted_and_cooldown_can_be_off():
    cfg = parse([{"name": "chat", "provider": "a", "weight": 1}, {"name": "chat", "provider": "b"},
                 {"name": "solo", "provider": "a", "cooldown": False}])
    s = pool_settings([m.routing for m in cfg.models[:2]])
    assert s.strategy == "weighted" and s.retries is None and s.deadline == 60
    assert s.cooldown == Cooldown()
    assert pool_settings([cfg.models[2].routing]).cooldown is None
    assert pool_settings([]).strategy == "round_robin"


def test_every_routing_mistake_is_reported_with_its_path():
    errors = errors_of([
        {"name": "chat", "provider": "a", "strategy": "fastest", "retries": -1, "deadline": "soon",
         "backoff": {"base": 1, "jitter": True}, "fallbacks": ["chat", "nowhere"],
         "cooldown": {"failures": 0}, "weight": -2, "route": {"team": ["x"]},
         "timeout": {"first_tokens": 3}},
        {"name": "chat", "provider": "b", "retries": 2, "id": "dup"},
        {"name": "other", "provider": "b", "id": "dup", "context_window_fallbacks": ["mock-x"]},
        {"name": "mock-*", "provider": "mock"},
    ])
    expected = [
        "models[0].strategy: expected one of round_robin, weighted, least_busy, latency, got 'fastest'",
        "models[0].retries: must be at least 0, got -1",
        "models[0].deadline: expected a number, got 'soon'",
        "models[0].fallbacks[0]: a model cannot fall back to itself ('chat')",
        "models[0].fallbacks[1]: no model named 'nowhere' in models:",
        "models[0].cooldown.failures: must be at least 1, got 0",
        "models[0].weight: must be at least 0, got -2.0",
        "models[2].id: 'dup' is already the id of models[1]",
    ]
    for line in expected:
        assert line in errors, errors
    assert any(e.startswith("models[0].backoff.jitter: unknown setting") for e in errors)
    assert any(e.startswith("models[0].route.team: unknown setting") for e in errors)
    assert any(e.startswith("models[0].timeout.first_tokens: unknown setting") for e in errors)
    assert not any("mock-x" in e for e in errors)  # a wildcard name is a valid fallback


def test_pool_knobs_that_disagree_are_an_error():
    errors = errors_of([{"name": "chat", "provider": "a", "retries": 1, "backoff": {"base": 1}},
                        {"name": "chat", "provider": "b", "retries": 1, "backoff": {"base": 2}}])
    assert errors == ["models[1].backoff: differs from models[0] of the same pool 'chat'; "
                      "pool settings must agree (or be written once)"]


# ---------------------------------------------------------------- policy

@pytest.mark.parametrize(("error", "retry"), [
    (ProxyError(429, "x"), True), (ProxyError(502, "x", code="upstream_error"), True),
    (ProxyError(503, "x"), True), (ProxyError(504, "x"), True),
    (ProxyError(502, "x", code="upstream_auth_failed"), False), (ProxyError(500, "x"), False),
    (ProxyError(400, "x"), False), (ProxyError(404, "x"), False), (ProxyError(413, "x"), False),
    (ProxyError(422, "x"), False), (ProxyError(499, "x", code="client_closed_request"), False),
])
def test_which_errors_are_retried(error, retry):
    assert policy.retryable(error) is retry


def test_retry_after_forms():
    def after(**headers):
        return policy.retry_after(ProxyError(429, "x", headers=headers), now=1_700_000_000)
    assert after(**{"retry-after": "12"}) == 12
    assert after(**{"retry-after": "1.5"}) == 1.5
    assert after(**{"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert after(**{"retry-after": "Tue, 14 Nov 2023 22:13:50 GMT"}) == pytest.approx(30)
    assert after(**{"retry-after": "Tue, 14 Nov 2023 22:10:00 GMT"}) == 0  # already past
    assert after(**{"retry-after": "soon"}) is None
    assert after(**{"retry-after": "-4"}) is None
    assert after() is None


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap():
    rng = random.Random(3)
    for attempt, ceiling in [(1, 0.5), (2, 1), (3, 2), (4, 4), (5, 4), (9, 4)]:
        waits = [policy.backoff(attempt, 0.5, 4, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 40  # jittered, not a fixed step
    assert policy.backoff(3, 0, 4, rng) == 0


# ---------------------------------------------------------------- the in-process breaker

async def test_breaker_opens_after_failures_in_a_window_and_probes_back():
    clock = FakeClock()
    breaker = LocalBreaker(clock)
    cd = Cooldown(failures=3, window=10, duration=30)
    assert not await breaker.failed("d", cd)
    clock.now += 11  # the first failure leaves the window
    assert not await breaker.failed("d", cd)
    assert not await breaker.failed("d", cd)
    assert await breaker.failed("d", cd)  # three within ten seconds
    assert breaker.cooling("d") == 30
    clock.now += 30
    assert breaker.cooling("d") == 0  # back in, on probation
    assert await breaker.failed("d", cd)  # one failure while probing re-opens it
    assert breaker.cooling("d") == 30
    clock.now += 30
    await breaker.succeeded("d")
    assert not breaker.troubled("d")
    assert not await breaker.failed("d", cd)  # closed again: counting starts over


def test_the_readme_routing_example_is_a_valid_config():
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Routing: pools, retries, fallbacks", 1)[1]
    example = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    providers = {"openai": {"plugin": "openai", "api_key": "k"}, "azure-eu": {"plugin": "openai"},
                 "ollama": {"plugin": "ollama", "api_base": "http://127.0.0.1:11434"}}
    cfg = parse_config({"plugins": {"dir": None}, "providers": providers, **example}, env={})
    chat = [m for m in cfg.models if m.name == "chat"]
    settings = pool_settings([m.routing for m in chat])
    assert [m.routing.id for m in chat] == ["openai-us", "azure-eu", "canary"]
    assert settings.fallbacks == ("chat-small", "local") and settings.strategy == "weighted"
    assert chat[2].routing.route == {"tier": frozenset({"pro", "enterprise"})}
