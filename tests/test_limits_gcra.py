"""GCRA in process with a fake clock, the headers it writes, and the ``limits:`` settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aiproxy.app import create_app
from aiproxy.builtin.limits.gcra import LocalStore, Rule, duration, headers, remaining
from aiproxy.builtin.limits.settings import Rate, key_override, parse_settings
from aiproxy.config import ConfigError, load_config
from tests.conftest import make_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rule(key: str = "k", limit: int = 4, window: float = 60.0, cost: int = 1, kind: str = "requests") -> Rule:
    return Rule(key, kind, limit, window, cost, f"key '{key}'")


def admitted(store: LocalStore, rules: list[Rule], times: int) -> int:
    return sum(store.take(rules).admitted for _ in range(times))


def test_a_full_bucket_admits_exactly_the_limit_then_capacity_returns_one_by_one() -> None:
    clock = Clock()
    store = LocalStore(clock)
    r = rule(limit=4, window=60)
    assert admitted(store, [r], 10) == 4
    refused = store.take([r])
    assert not refused.admitted and refused.wait == pytest.approx(15)  # T = 60 / 4
    clock.now += 14.9
    assert admitted(store, [r], 3) == 0
    clock.now += 0.1
    assert admitted(store, [r], 3) == 1  # one unit back every 15 s, not the whole window
    clock.now += 30
    assert admitted(store, [r], 3) == 2


def test_no_twice_the_limit_across_a_window_boundary() -> None:
    clock = Clock()
    store = LocalStore(clock)
    r = rule(limit=10, window=60)
    clock.now += 59.9  # a fixed window would reset at +60: 10 before and 10 after
    assert admitted(store, [r], 10) == 10
    clock.now += 0.2
    assert admitted(store, [r], 10) == 0
    clock.now += 60  # a whole window after the burst: full again, and no more than full
    assert admitted(store, [r], 20) == 10


def test_an_odd_limit_admits_exactly_its_number_despite_float_division() -> None:
    store = LocalStore(Clock())
    for limit in (3, 7, 9, 13, 1000):
        assert admitted(store, [rule(f"k{limit}", limit=limit, window=3600)], limit + 5) == limit


def test_one_call_takes_from_all_its_limits_or_from_none() -> None:
    store = LocalStore(Clock())
    key, model = rule("key", limit=5), rule("model", limit=2)
    assert admitted(store, [key, model], 5) == 2
    assert store.take([key]).admitted  # the key was charged only for the two admitted calls
    assert admitted(store, [key], 5) == 2
    verdict = store.take([key, model])
    assert not verdict.admitted and verdict.failed in (0, 1)


def test_a_refusal_names_the_limit_needing_the_longest_wait() -> None:
    store = LocalStore(Clock())
    short, long = rule("short", limit=2, window=10), rule("long", limit=2, window=100)
    assert admitted(store, [short, long], 2) == 2
    verdict = store.take([short, long])
    assert verdict.failed == 1 and verdict.wait == pytest.approx(50)


def test_settling_gives_back_or_charges_tokens() -> None:
    clock = Clock()
    store = LocalStore(clock)
    tpm = rule("t", limit=1000, window=60, cost=600, kind="tokens")
    verdict = store.take([tpm])
    assert remaining(tpm, verdict.ahead[0]) == 400
    assert not store.take([tpm]).admitted
    store.settle([tpm], 100 - 600, [verdict.at + verdict.ahead[0]])  # it used 100 of the 600
    assert remaining(tpm, store.tats["t"] - clock.now) == 900
    verdict = store.take([tpm])
    assert verdict.admitted
    store.settle([tpm], 300, [verdict.at + verdict.ahead[0]])  # used more than reserved: charged
    assert remaining(tpm, store.tats["t"] - clock.now) == 0


def test_a_call_outlasting_a_swept_counter_is_charged_from_its_own_take() -> None:
    clock = Clock()
    store = LocalStore(clock, sweep_at=1)
    tpm = rule("t", limit=1000, window=60, cost=100, kind="tokens")  # T = 60 ms; 6 s ahead
    verdict = store.take([tpm])
    clock.now += 10  # the call runs on; its counter is full again and swept with another's take
    store.take([rule("a")])
    store.take([rule("b")])
    assert "t" not in store.tats
    store.settle([tpm], 900, [verdict.at + verdict.ahead[0]])  # it used 1000: 60 s of the bucket
    assert store.tats["t"] - clock.now == pytest.approx(50)  # dated from its take: 50 s ahead
    assert remaining(tpm, store.tats["t"] - clock.now) == 166
    store.settle([tpm], -2000, [verdict.at + verdict.ahead[0]])
    assert store.tats["t"] <= clock.now  # a refund never charges: full again


def test_counters_back_to_full_are_swept() -> None:
    clock = Clock()
    store = LocalStore(clock, sweep_at=10)
    for i in range(10):
        store.take([rule(f"k{i}")])
    clock.now += 16  # each took one unit of 15 s
    store.take([rule("new")])
    assert list(store.tats) == ["new"]


@pytest.mark.parametrize(("seconds", "text"), [
    (0.12, "120ms"), (0.0004, "1ms"), (0, "0ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"),
    (59.9999, "1m0s"), (3600, "1h0m0s"), (3723.25, "1h2m3.25s"),
])
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_headers_report_the_tightest_limit_of_each_kind() -> None:
    key, tenant = rule("key", limit=100, window=3600), rule("tenant", limit=10, window=60)
    tpm = rule("t", limit=1000, cost=50, kind="tokens")
    # the key has 98 left; the tenant 10 - 4 = 6 (4 periods of 6 s ahead)
    out = headers([key, tenant, tpm], [72.0, 24.0, 3.0])
    assert out == {
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "6",
        "x-ratelimit-reset-requests": "24s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "950",
        "x-ratelimit-reset-tokens": "3s",
    }


# ---------------------------------------------------------------- settings
def test_the_shipped_shape_parses_with_strings_from_the_environment() -> None:
    settings = parse_settings({"window_seconds": "60", "tiers": {
        "free": {"requests": "10"}, "pro": {"requests": 1000, "window_seconds": 3600,
                                            "tokens_per_minute": 90000}},
        "models": {"gpt-4o": {"tokens_per_minute": 30000}}})
    assert settings.tiers["free"] == Rate(10, 60.0, None)
    assert settings.tiers["pro"] == Rate(1000, 3600.0, 90000)
    assert settings.models["gpt-4o"] == Rate(None, 60.0, 30000)
    assert settings.model_tiers == {}
    per_tier = parse_settings({"tiers": {"free": {"requests": 9}},
                               "models": {"m": {"tiers": {"free": {"tokens_per_minute": 500}}}}})
    assert per_tier.models == {} and per_tier.model_tiers == {"m": {"free": Rate(None, 3600.0, 500)}}
    assert settings.default_tier == "free" and settings.anonymous_tier is None and settings.fail_open


@pytest.mark.parametrize(("raw", "message"), [
    ({"tiers": {"free": {"requests": 0}}}, "limits.tiers.free.requests: expected a whole number ≥ 1, got 0"),
    ({"tiers": {"free": {"requests": "ten"}}}, "limits.tiers.free.requests: expected a whole number ≥ 1"),
    ({"tiers": {"free": {"requests": 2.5}}}, "limits.tiers.free.requests: expected a whole number ≥ 1"),
    ({"tiers": {"free": {"requests": 5, "window_seconds": -1}}},
     "limits.tiers.free.window_seconds: expected a number of seconds > 0"),
    ({"tiers": {"free": {"rpm": 5}}}, "limits.tiers.free.rpm: unknown setting"),
    ({"models": {"gpt-4o": {"tokens_per_minute": True}}}, "limits.models.gpt-4o.tokens_per_minute"),
    ({"on_backend_error": "maybe"}, "limits.on_backend_error: expected open or closed"),
    ({"scopes": ["key", "team"]}, "limits.scopes: expected a list of key, user, tenant"),
    ({"tiers": {"free": {"requests": 1}}, "anonymous_tier": "gold"},
     "limits.anonymous_tier: expected the name of a tier in limits.tiers (free), got 'gold'"),
    ({"tier": {}}, "limits.tier: unknown setting"),
    ({"tiers": {"free": {"requests": 1}}, "models": {"m": {"tiers": {"gold": {"requests": 1}}}}},
     "limits.models.m.tiers.gold: no tier 'gold' in limits.tiers (free)"),
    ({"tiers": {"free": {"requests": 1}}, "models": {"m": {"tiers": {"free": {"requests": 0}}}}},
     "limits.models.m.tiers.free.requests: expected a whole number ≥ 1"),
    ({"models": {"m": {"rpm": 1}}}, "limits.models.m.rpm: unknown setting"),
    # not finite: NaN compares false, so a NaN window admitted everything; inf crashed int()
    ({"window_seconds": "nan", "tiers": {"free": {"requests": 1}}},
     "limits.window_seconds: expected a number of seconds > 0, got 'nan'"),
    ({"tiers": {"free": {"requests": 1, "window_seconds": float("inf")}}},
     "limits.tiers.free.window_seconds: expected a number of seconds > 0, got inf"),
    ({"tiers": {"free": {"requests": "inf"}}}, "limits.tiers.free.requests: expected a whole number ≥ 1"),
    ({"tiers": {"free": {"tokens_per_minute": float("nan")}}},
     "limits.tiers.free.tokens_per_minute: expected a whole number ≥ 1"),
    ({"completion_estimate": "1e400"}, "limits.completion_estimate: expected a whole number ≥ 0"),
])
def test_a_bad_setting_is_named_by_its_path(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert any(e.startswith(message) for e in info.value.errors), info.value.errors


def test_a_bad_limits_section_stops_start_up_naming_the_setting() -> None:
    config = make_config(limits={"tiers": {"free": {"requests": -3}}})
    with pytest.raises(ConfigError) as info:
        create_app(config)
    assert "limits.tiers.free.requests: expected a whole number ≥ 1, got -3" in str(info.value)


def test_a_redis_url_redis_cannot_use_stops_start_up_without_echoing_it() -> None:
    config = make_config(limits={"tiers": {"free": {"requests": 3}}},
                         redis={"url": "http://user:hunter2@127.0.0.1:6379"})
    with pytest.raises(ConfigError) as info:
        create_app(config)
    assert "redis.url: not a URL Redis can use" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_a_key_override_replaces_only_what_it_names() -> None:
    tier = Rate(10, 3600.0, 5000)
    assert key_override({"rate_limits": {"requests": 50}}, tier, 3600) == Rate(50, 3600.0, 5000)
    assert key_override({"rate_limits": {"tokens_per_minute": 7, "window_seconds": 60}}, None, 3600) \
        == Rate(None, 60.0, 7)
    assert key_override({"rate_limits": {"requests": "lots"}}, tier, 3600) == tier  # malformed: ignored
    assert key_override({"rate_limits": {"requests": -1}}, None, 3600) is None


def test_the_shipped_config_has_the_four_tiers_and_reads_the_seed_environment_names() -> None:
    shipped = Path(__file__).resolve().parent.parent / "config.yaml"
    defaults = parse_settings(load_config(shipped, env={}).section("limits"))
    assert {name: (r.requests, r.window, r.tokens_per_minute) for name, r in defaults.tiers.items()} == {
        "free": (10, 3600.0, None), "starter": (100, 3600.0, None), "pro": (1000, 3600.0, None),
        "enterprise": (10000, 3600.0, None)}
    assert defaults.anonymous_tier is None and defaults.fail_open  # make serve + curl: never refused
    env = {"AI_RATE_LIMIT_FREE": "25", "AI_RATE_LIMIT_WINDOW": "60"}
    seeded = parse_settings(load_config(shipped, env=env).section("limits"))
    assert seeded.tiers["free"] == Rate(25, 60.0, None)
    assert seeded.tiers["pro"] == Rate(1000, 60.0, None)  # the window is every tier's


def test_several_workers_counting_in_process_are_warned_about(caplog: Any) -> None:
    import logging

    from aiproxy.builtin.limits import Limits

    with caplog.at_level(logging.WARNING, logger="aiproxy.limits"):
        Limits(make_config(limits={"tiers": {"free": {"requests": 3}}}, server={"workers": 3}))
        Limits(make_config(limits={}, server={"workers": 3}))  # nothing limited: nothing to say
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["limits: each of the 3 workers counts on its own (set redis.url to share the "
                        "counters): a limit of N admits up to 3 times N"]
