"""The cost stage: each call priced by hand against the published prices, through the
gateway with fake upstreams returning known usage (OpenAI, Anthropic, Google; whole
answers and streams; cached tokens and cache writes), overrides, unknown models, cache hits."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from aiproxy import hookimpl
from aiproxy.app import create_app
from aiproxy.builtin.cost import prices
from aiproxy.call import Call, Usage
from aiproxy.config import ConfigError
from aiproxy.provider import Reply
from tests.conftest import CHAT, OPENAI_BASE, make_config
from tests.google_support import GEMINI, GENERATE, GOOGLE_BASE, GOOGLE_KEY
from tests.google_support import STREAM as GOOGLE_STREAM
from tests.helpers import CHAT_URL, with_plugins

FIXTURES = Path(__file__).parent / "fixtures"
ANTHROPIC = "https://api.anthropic.test/v1"


class Finished:
    """Keeps each call that reaches after-call or on-error; it runs before the cost stage
    (registered last), so the call is read once the response is back."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        self.calls.append(call)

    @hookimpl
    def aiproxy_on_error(self, call: Call) -> None:
        self.calls.append(call)


def config(models: list[dict[str, Any]], **sections: Any) -> Any:
    return make_config(
        providers={
            "openai": {"plugin": "openai", "api_base": OPENAI_BASE, "api_key": "sk-up"},
            "anthropic": {"plugin": "anthropic", "api_base": ANTHROPIC, "api_key": "sk-ant"},
            "google": {"plugin": "google", "api_base": GOOGLE_BASE, "api_key": GOOGLE_KEY},
            "mock": {"plugin": "mock"},
        },
        models=models, **sections)


MODELS = [
    {"name": "gpt-test", "provider": "openai", "model": "gpt-4o-mini", "retries": 0},
    {"name": "gpt-dated", "provider": "openai", "model": "gpt-4o-2024-08-06", "retries": 0},
    {"name": "claude-test", "provider": "anthropic", "model": "claude-sonnet-4-5-20250929", "retries": 0},
    {"name": "gemini-test", "provider": "google", "model": "gemini-2.5-flash", "retries": 0},
    {"name": "gemini-pro", "provider": "google", "model": "gemini-2.5-pro", "retries": 0},
    {"name": "gemini-embed", "provider": "google", "model": "gemini-embedding-001", "retries": 0},
    {"name": "mock-*", "provider": "mock"},
]


async def run(gateway: Any, cfg: Any, mock: Any, body: dict[str, Any],
              path: str = "/v1/chat/completions") -> tuple[httpx.Response, Call]:
    finished = Finished()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, finished=finished)) as (http, upstream):
        mock(upstream)
        r = await http.post(path, json=body)
    assert r.status_code == 200, r.text
    assert len(finished.calls) == 1
    return r, finished.calls[0]


def openai_answer(usage: dict[str, Any], model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                         "finish_reason": "stop"}], "usage": usage}


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


# ---------------------------------------------------------------- OpenAI

async def test_openai_whole_answer_with_cached_prompt_tokens(gateway):
    # gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per million tokens.
    # 1234 prompt tokens of which 1024 cached, 56 completion:
    # 210 x 0.15 + 1024 x 0.075 + 56 x 0.60 = 31.5 + 76.8 + 33.6 = 141.9 per million
    usage = {"prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290,
             "prompt_tokens_details": {"cached_tokens": 1024}}
    r, call = await run(gateway, config(MODELS), lambda up: up.post(CHAT_URL).respond(
        200, json=openai_answer(usage)), CHAT)
    assert r.headers["x-aiproxy-cost"] == "0.0001419"
    assert call.cost == 0.0001419
    assert "cost_unpriced" not in call.metadata


async def test_cache_writes_an_openai_compatible_upstream_reports_are_priced_apart(gateway):
    # OpenRouter-style usage in front of a Claude model: prompt_tokens_details.cache_write_tokens.
    # 1210 prompt (1000 read, 200 written), 10 completion at $3 / $0.30 read / $3.75 write / $15:
    # 10 x 3 + 1000 x 0.30 + 200 x 3.75 + 10 x 15 = 30 + 300 + 750 + 150 = 1230 per million
    models = [{"name": "routed-claude", "provider": "openai", "model": "anthropic/claude-sonnet-4.5",
               "price": {"input": 3, "output": 15, "cached_input": 0.3, "cache_write": 3.75}}]
    usage = {"prompt_tokens": 1210, "completion_tokens": 10, "total_tokens": 1220,
             "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 200}}
    r, call = await run(gateway, config(models), lambda up: up.post(CHAT_URL).respond(
        200, json=openai_answer(usage)), {**CHAT, "model": "routed-claude"})
    assert call.usage is not None and call.usage.cache_write_tokens == 200
    assert r.headers["x-aiproxy-cost"] == "0.00123"
    assert r.json()["usage"] == usage  # relayed as the upstream sent it


async def test_openai_stream_cost_is_in_the_call_not_a_header(gateway):
    # 2000 prompt (500 cached), 300 completion on gpt-4o-mini:
    # 1500 x 0.15 + 500 x 0.075 + 300 x 0.60 = 225 + 37.5 + 180 = 442.5 per million
    body = sse(chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop"),
               {**chunk({}), "choices": [], "usage": {
                   "prompt_tokens": 2000, "completion_tokens": 300, "total_tokens": 2300,
                   "prompt_tokens_details": {"cached_tokens": 500}}}, b"[DONE]")
    r, call = await run(gateway, config(MODELS), lambda up: up.post(CHAT_URL).respond(
        200, headers={"content-type": "text/event-stream"}, content=body), {**CHAT, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "x-aiproxy-cost" not in r.headers  # the head went out before the usage came
    assert call.cost == 0.0004425


async def test_a_stream_cut_short_is_priced_on_its_estimated_usage(gateway):
    # the upstream ends without a usage chunk or [DONE]: the gateway estimates the usage
    body = sse(chunk({"role": "assistant", "content": "Hello there my friend"}))
    _r, call = await run(gateway, config(MODELS), lambda up: up.post(CHAT_URL).respond(
        200, headers={"content-type": "text/event-stream"}, content=body), {**CHAT, "stream": True})
    assert call.metadata.get("usage_estimated") is True
    u = call.usage
    assert u is not None and u.prompt_tokens > 0 and u.completion_tokens > 0
    assert call.cost == float((Decimal(u.prompt_tokens) * Decimal("0.15")
                               + Decimal(u.completion_tokens) * Decimal("0.60")) / 1_000_000)


async def test_a_dated_snapshot_is_priced_as_its_model(gateway):
    # gpt-4o-2024-08-06 → gpt-4o: $2.50 in, $10 out: 1000 x 2.5 + 100 x 10 = 3500 per million
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    r, _call = await run(gateway, config(MODELS), lambda up: up.post(CHAT_URL).respond(
        200, json=openai_answer(usage, "gpt-4o-2024-08-06")), {**CHAT, "model": "gpt-dated"})
    assert r.headers["x-aiproxy-cost"] == "0.0035"


async def test_a_fallback_is_priced_as_the_model_that_served(gateway):
    models = [{"name": "primary", "provider": "openai", "model": "gpt-4o", "retries": 0,
               "fallbacks": ["backup"]},
              {"name": "backup", "provider": "openai", "model": "gpt-4o-mini", "retries": 0}]

    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["model"] == "gpt-4o":
            return httpx.Response(503, json={"error": {"message": "down", "type": "server_error"}})
        return httpx.Response(200, json=openai_answer(
            {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}))

    r, call = await run(gateway, config(models), lambda up: up.post(CHAT_URL).mock(side_effect=answer),
                        {**CHAT, "model": "primary"})
    assert call.metadata["fallback"] == "backup"
    # gpt-4o-mini, not gpt-4o: 1000 x 0.15 + 1000 x 0.60 = 750 per million (gpt-4o: 12500)
    assert r.headers["x-aiproxy-cost"] == "0.00075"


# ---------------------------------------------------------------- Anthropic

async def test_anthropic_whole_answer_prices_cache_reads_and_writes(gateway):
    # fixture: input 12, cache_creation 100, cache_read 2000, output 10 on Sonnet 4.5:
    # $3 input, $3.75 cache write, $0.30 cache hit, $15 output per million:
    # 12 x 3 + 100 x 3.75 + 2000 x 0.30 + 10 x 15 = 36 + 375 + 600 + 150 = 1161 per million
    fixture = json.loads((FIXTURES / "anthropic" / "message_text.json").read_text())
    r, call = await run(gateway, config(MODELS), lambda up: up.post(f"{ANTHROPIC}/messages").respond(
        200, json=fixture), {**CHAT, "model": "claude-test"})
    assert call.usage == Usage(2112, 10, 2122, 2000, 100)
    assert r.headers["x-aiproxy-cost"] == "0.001161"
    assert call.cost == 0.001161


async def test_anthropic_stream_prices_cache_reads_and_writes(gateway):
    # fixture: input 25, cache_creation 3, cache_read 8, output 15 (in message_delta):
    # 25 x 3 + 3 x 3.75 + 8 x 0.30 + 15 x 15 = 75 + 11.25 + 2.4 + 225 = 313.65 per million
    raw = (FIXTURES / "anthropic" / "stream_text.sse").read_bytes()
    r, call = await run(gateway, config(MODELS), lambda up: up.post(f"{ANTHROPIC}/messages").respond(
        200, headers={"content-type": "text/event-stream"}, content=raw),
        {**CHAT, "model": "claude-test", "stream": True})
    assert "x-aiproxy-cost" not in r.headers
    assert call.cost == 0.00031365


# ---------------------------------------------------------------- Google

async def test_google_whole_answer_prices_context_cache_and_thoughts(gateway):
    # fixture: prompt 9 of which 6 cached, 4 candidates + 20 thoughts, gemini-2.5-flash:
    # $0.30 input, $0.03 cached, $2.50 output: 3 x 0.30 + 6 x 0.03 + 24 x 2.50 = 0.9 + 0.18 + 60
    fixture = json.loads((FIXTURES / "google" / "generate_text.json").read_text())
    r, _call = await run(gateway, config(MODELS), lambda up: up.post(GENERATE).respond(200, json=fixture),
                        GEMINI)
    assert r.headers["x-aiproxy-cost"] == "0.00006108"


async def test_google_stream(gateway):
    # last usageMetadata: prompt 9, candidates 4 + thoughts 12: 9 x 0.30 + 16 x 2.50 = 42.7 per million
    raw = (FIXTURES / "google" / "stream_text.sse").read_bytes()
    _r, call = await run(gateway, config(MODELS), lambda up: up.post(
        GOOGLE_STREAM, params={"alt": "sse"}).respond(200, headers={"content-type": "text/event-stream"},
                                                      content=raw), {**GEMINI, "stream": True})
    assert call.cost == 0.0000427


@pytest.mark.parametrize(("prompt", "cached", "out", "expected"), [
    # ≤ 200k prompt: $1.25 in, $0.125 cached, $10 out: 2000 x 1.25 + 8000 x 0.125 + 500 x 10 = 8500
    (10_000, 8_000, 500, "0.0085"),
    # > 200k: every token at $2.50 in, $0.25 cached, $15 out:
    # 240000 x 2.5 + 10000 x 0.25 + 1000 x 15 = 600000 + 2500 + 15000 = 617500 per million
    (250_000, 10_000, 1_000, "0.6175"),
])
async def test_gemini_pro_long_context_rates(gateway, prompt, cached, out, expected):
    data = json.loads((FIXTURES / "google" / "generate_text.json").read_text())
    data["usageMetadata"] = {"promptTokenCount": prompt, "candidatesTokenCount": out,
                             "totalTokenCount": prompt + out, "cachedContentTokenCount": cached}
    url = f"{GOOGLE_BASE}/models/gemini-2.5-pro:generateContent"
    r, _ = await run(gateway, config(MODELS), lambda up: up.post(url).respond(200, json=data),
                     {**GEMINI, "model": "gemini-pro"})
    assert r.headers["x-aiproxy-cost"] == expected


async def test_gemini_embeddings_report_no_usage_so_are_priced_on_an_estimate(gateway):
    # "a" x 400 is 100 tokens by the ceil(bytes/4) estimate: 100 x $0.15 per million
    url = f"{GOOGLE_BASE}/models/gemini-embedding-001:embedContent"
    r, call = await run(gateway, config(MODELS), lambda up: up.post(url).respond(
        200, json={"embedding": {"values": [0.1, 0.2]}}),
        {"model": "gemini-embed", "input": "a" * 400}, path="/v1/embeddings")
    assert call.metadata["cost_estimated"] is True
    assert r.headers["x-aiproxy-cost"] == "0.000015"


# ---------------------------------------------------------------- overrides, unknown, cache

async def test_a_models_entry_price_wins_over_cost_prices_which_wins_over_the_table(gateway):
    models = [{"name": "own", "provider": "openai", "model": "gpt-4o-mini", "retries": 0,
               "price": {"input": 1, "output": 2}},
              {"name": "listed", "provider": "openai", "model": "gpt-4o-mini", "retries": 0}]
    cfg = config(models, cost={"prices": {"GPT-4o-mini": {
        "input": 0.5, "output": 1, "cached_input": 0.25}}})
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
             "prompt_tokens_details": {"cached_tokens": 600}}
    mock = lambda up: up.post(CHAT_URL).respond(200, json=openai_answer(usage))  # noqa: E731
    r, _ = await run(gateway, cfg, mock, {**CHAT, "model": "own"})
    # own price, no cached rate given (so none): 1000 x 1 + 100 x 2 = 1200 per million
    assert r.headers["x-aiproxy-cost"] == "0.0012"
    r, _ = await run(gateway, cfg, mock, {**CHAT, "model": "listed"})
    # cost.prices: 400 x 0.5 + 600 x 0.25 + 100 x 1 = 200 + 150 + 100 = 450 per million
    assert r.headers["x-aiproxy-cost"] == "0.00045"


async def test_long_context_override_from_yaml(gateway):
    models = [{"name": "big", "provider": "openai", "model": "gpt-4o-mini", "retries": 0,
               "price": {"input": 1, "output": 2, "long_context": {"threshold": 1000, "input": 3}}}]
    cfg = config(models)
    for prompt, expected in ((1000, "0.0012"), (1001, "0.003203")):  # 1000x1+100x2; 1001x3+100x2
        usage = {"prompt_tokens": prompt, "completion_tokens": 100, "total_tokens": prompt + 100}
        r, _ = await run(gateway, cfg, lambda up, u=usage: up.post(CHAT_URL).respond(
            200, json=openai_answer(u)), {**CHAT, "model": "big"})
        assert r.headers["x-aiproxy-cost"] == expected


async def test_an_unknown_model_costs_0_with_one_warning(gateway, caplog):
    cfg = config([{"name": "ft", "provider": "openai", "model": "ft:my-own-model", "retries": 0}])
    finished = Finished()
    usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
    caplog.set_level(logging.WARNING, logger="aiproxy.cost")
    pm = with_plugins(cfg, finished=finished)
    async with gateway(cfg, plugin_manager=pm) as (http, upstream):
        upstream.post(CHAT_URL).respond(200, json=openai_answer(usage))
        for _ in range(3):
            r = await http.post("/v1/chat/completions", json={**CHAT, "model": "ft"})
            assert r.status_code == 200
            assert r.headers["x-aiproxy-cost"] == "0"
    stats = pm.get_plugin("cost").aiproxy_stats()
    warnings = [rec for rec in caplog.records if "no price for model" in rec.getMessage()]
    assert len(warnings) == 1 and "ft:my-own-model" in warnings[0].getMessage()
    assert [c.cost for c in finished.calls] == [0.0, 0.0, 0.0]
    assert all(c.metadata["cost_unpriced"] for c in finished.calls)
    assert stats["aiproxy_cost_unpriced_calls_total"] == 3


async def test_mock_models_are_free_unless_priced(gateway, caplog):
    caplog.set_level(logging.WARNING, logger="aiproxy.cost")
    body = {"model": "mock-x", "messages": [{"role": "user", "content": "one two three four"}]}
    r, call = await run(gateway, config(MODELS), lambda up: None, body)
    assert r.headers["x-aiproxy-cost"] == "0" and call.cost == 0.0
    assert not [rec for rec in caplog.records if "no price" in rec.getMessage()]
    cfg = config(MODELS, cost={"prices": {"mock-x": {"input": 1000, "output": 2000}}})
    r, call = await run(gateway, cfg, lambda up: None, body)
    u = call.usage
    assert u is not None and u.prompt_tokens > 0 and u.completion_tokens > 0
    expected = (Decimal(u.prompt_tokens) * 1000 + Decimal(u.completion_tokens) * 2000) / 1_000_000
    assert r.headers["x-aiproxy-cost"] == prices.usd(expected)
    assert call.cost == float(expected)


class CacheHit:
    """Answers cache-lookup with a stored answer, as the cache stage would."""

    def __init__(self, usage: dict[str, Any]) -> None:
        self.usage = usage

    @hookimpl
    def aiproxy_cache_lookup(self, call: Call) -> Reply:
        return Reply(openai_answer(self.usage))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_cache_hit_costs_0_and_records_what_it_saved(gateway, stream):
    # gpt-4o-mini, 1000 prompt, 200 completion: 1000 x 0.15 + 200 x 0.60 = 270 per million
    cfg = config(MODELS)
    finished = Finished()
    hit = CacheHit({"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200})
    pm = with_plugins(cfg, finished=finished, hit=hit)
    async with gateway(cfg, plugin_manager=pm) as (http, upstream):
        route = upstream.post(CHAT_URL).respond(500)
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert r.status_code == 200 and not route.called
    (call,) = finished.calls
    assert call.cached and call.cost == 0.0
    assert call.metadata["cost_saved"] == 0.00027
    if not stream:
        assert r.headers["x-aiproxy-cost"] == "0"


async def test_a_stream_that_fails_midway_is_priced_in_on_error(gateway):
    body = sse(chunk({"role": "assistant", "content": "Hello there"}),
               {"error": {"message": "upstream broke", "type": "server_error"}})
    _r, call = await run(gateway, config(MODELS), lambda up: up.post(CHAT_URL).respond(
        200, headers={"content-type": "text/event-stream"}, content=body), {**CHAT, "stream": True})
    assert call.error is not None and call.usage is not None
    u = call.usage
    assert call.cost == float((Decimal(u.prompt_tokens) * Decimal("0.15")
                               + Decimal(u.completion_tokens) * Decimal("0.60")) / 1_000_000)
    assert call.cost > 0


# ---------------------------------------------------------------- config errors, units

def test_a_bad_model_price_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as e:
        config([{"name": "x", "provider": "openai", "price": {"input": "cheap", "outptu": 1}}])
    text = "\n".join(e.value.errors)
    assert "models[0].price.input: expected a number, got 'cheap'" in text
    assert "models[0].price.outptu: unknown setting" in text
    assert "models[0].price.output: is required" in text


def test_bad_cost_settings_stop_start_up_naming_them():
    cfg = config(MODELS, cost={"prices": {"gpt-4o": {"input": -1, "output": 1}},
                               "alert_threshold_usd": "lots", "alert_email": "ops@example.com",
                               "colour": "red"})
    with pytest.raises(ConfigError) as e:
        create_app(cfg)
    text = str(e.value)
    assert "cost.prices.gpt-4o.input: must be at least 0" in text
    assert "cost.alert_threshold_usd: expected a number of USD, got 'lots'" in text
    assert "cost.smtp.host: is required to send cost.alert_email" in text
    assert "cost.colour: unknown setting" in text


def test_usd_is_plain_decimal():
    assert prices.usd(Decimal("75") / 1_000_000_000) == "0.000000075"
    assert prices.usd(Decimal(0)) == "0"
    assert prices.usd(Decimal("12.5000")) == "12.5"
    assert prices.usd(Decimal("1E+2")) == "100"


def test_snapshot_names():
    table = prices.BUILTIN["anthropic"]
    assert prices.lookup(table, "claude-sonnet-4-5-20250929") is table["claude-sonnet-4-5"]
    assert prices.lookup(table, "claude-sonnet-4-5@20250929") is table["claude-sonnet-4-5"]
    assert prices.lookup(table, "claude-3-5-haiku-latest") is table["claude-3-5-haiku"]
    assert prices.lookup(prices.BUILTIN["google"], "models/gemini-2.5-flash") is not None
    assert prices.lookup(prices.BUILTIN["openai"], "gpt-4o-audio-preview") is None  # not gpt-4o's price


def test_the_readme_example_is_a_valid_config_priced_as_it_says():
    import yaml

    from aiproxy.builtin.cost import CostStage

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Cost", 1)[1]
    example = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])
    providers = {"openai": {"plugin": "openai", "api_key": "k"},
                 "anthropic": {"plugin": "anthropic", "api_key": "k"}}
    cfg = make_config(providers=providers, **example)
    stage = CostStage(cfg)
    claude = stage.model_prices[id(cfg.models[1])]
    # 300k prompt tokens of which 100k cache reads, 1000 out, past the 200k threshold:
    # 200000 x 6 + 100000 x 0.60 + 1000 x 22.50 = 1200000 + 60000 + 22500 per million
    assert claude.cost(Usage(300_000, 1000, 301_000, 100_000)) == Decimal("1.2825")
    assert stage.prices["my-finetune"].cost(Usage(1_000_000, 1_000_000, 2_000_000)) == Decimal("1.5")
    assert stage.free == {"mock", "ollama"}


def test_the_shipped_config_reads_the_alert_settings_from_the_environment():
    from aiproxy.builtin.cost import CostStage
    from aiproxy.config import load_config

    root = Path(__file__).resolve().parent.parent
    assert CostStage(load_config(root / "config.yaml", env={})).spend is not None  # $100 by default
    env = {"AI_COST_ALERT_THRESHOLD": "12.5", "AI_COST_ALERT_EMAIL": "ops@x.test, cfo@x.test",
           "AI_COST_ALERT_WEBHOOK": "https://hooks.x.test/cost", "AI_SMTP_HOST": "smtp.x.test",
           "AI_SMTP_USERNAME": "mailer", "AI_SMTP_PASSWORD": "pw-from-env"}
    spend = CostStage(load_config(root / "config.yaml", env=env)).spend
    assert spend is not None and spend.threshold == Decimal("12.5")
    n = spend.notifiers
    assert n.emails == ["ops@x.test", "cfo@x.test"] and n.webhooks == ["https://hooks.x.test/cost"]
    assert n.smtp is not None and (n.smtp.host, n.smtp.port, n.smtp.starttls) == ("smtp.x.test", 587, True)
    assert (n.smtp.username, n.smtp.password) == ("mailer", "pw-from-env")
    assert CostStage(load_config(root / "config.yaml", env={"AI_COST_ALERT_THRESHOLD": "0"})).spend is None


async def test_with_the_real_cache_a_repeat_costs_0_and_saves_what_the_first_cost(gateway):
    cfg = config(MODELS, cache={})  # the cache stage, in process, its defaults
    usage = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
    finished = Finished()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, finished=finished)) as (http, upstream):
        route = upstream.post(CHAT_URL).respond(200, json=openai_answer(usage))
        body = {**CHAT, "temperature": 0}
        first = await http.post("/v1/chat/completions", json=body)
        again = await http.post("/v1/chat/completions", json=body)
    assert route.call_count == 1
    assert (first.headers["x-aiproxy-cache"], again.headers["x-aiproxy-cache"]) == ("miss", "hit")
    # 1000 x 0.15 + 200 x 0.60 = 270 per million
    assert (first.headers["x-aiproxy-cost"], again.headers["x-aiproxy-cost"]) == ("0.00027", "0")
    assert finished.calls[1].metadata["cost_saved"] == 0.00027


@pytest.mark.parametrize(("usage", "expected"), [
    # a negative count is no tokens: 0 x 0.15 + 100 x 0.60 = 60 per million
    ({"prompt_tokens": -1000, "completion_tokens": 100, "total_tokens": -900}, "0.00006"),
    # negative cached tokens are none cached: 1000 x 0.15 + 100 x 0.60 = 210 per million
    ({"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
      "prompt_tokens_details": {"cached_tokens": -500}}, "0.00021"),
    ({"prompt_tokens": 10, "completion_tokens": -10**6, "total_tokens": 0}, "0.0000015"),
])
async def test_negative_token_counts_from_an_upstream_cost_nothing(gateway, usage, expected):
    # an upstream may send anything: a negative count must not make a negative cost (a
    # malformed x-aiproxy-cost, a refund of spend) nor a discount worth more than the tokens
    r, call = await run(gateway, config(MODELS), lambda up: up.post(CHAT_URL).respond(
        200, json=openai_answer(usage)), CHAT)
    assert r.headers["x-aiproxy-cost"] == expected
    assert call.cost == float(Decimal(expected))


@pytest.mark.parametrize(("price", "message"), [
    ({"input": float("inf"), "output": 1}, "models[0].price.input: expected a finite number"),
    ({"input": 1, "output": "nan"}, "models[0].price.output: expected a finite number"),
    ({"input": 1, "output": 1, "long_context": {"threshold": float("inf")}},
     "models[0].price.long_context.threshold: expected a whole number"),
    ({"input": 1, "output": 1, "long_context": {"threshold": 10, "cache_write": float("nan")}},
     "models[0].price.long_context.cache_write: expected a finite number"),
])
def test_a_price_that_is_not_a_finite_number_is_a_config_error_naming_it(price, message):
    # YAML's .inf / .nan are floats; before, they passed the check and start-up then failed
    # with "invalid literal for int() with base 10: 'F'" or an OverflowError
    with pytest.raises(ConfigError) as e:
        config([{"name": "x", "provider": "openai", "price": price}])
    assert message in "\n".join(e.value.errors)


@pytest.mark.parametrize(("cost", "message"), [
    ({"prices": {"m": {"input": "nan", "output": 1}}}, "cost.prices.m.input: expected a finite number"),
    ({"alert_retries": float("inf")}, "cost.alert_retries: expected a finite number"),
    ({"flush_interval": "nan"}, "cost.flush_interval: expected a finite number"),
    ({"webhook_timeout": float("inf")}, "cost.webhook_timeout: expected a finite number"),
])
def test_cost_settings_that_are_not_finite_stop_start_up_naming_them(cost, message):
    cfg = config(MODELS, cost={"alert_threshold_usd": 1, "alert_webhook": "http://127.0.0.1:9/x", **cost})
    with pytest.raises(ConfigError) as e:
        create_app(cfg)
    assert message in str(e.value)


@pytest.mark.parametrize(("value", "expected"), [("True", True), ("YES", True), (" on ", True), (True, True),
                                                 ("False", False), ("0", False), ("", False)])
def test_smtp_starttls_is_read_in_any_case(value, expected):
    # AI_SMTP_STARTTLS=True was read as false: the login and its password then went to
    # the SMTP server without TLS
    from aiproxy.builtin.cost import CostStage

    cfg = config(MODELS, cost={"alert_threshold_usd": 1, "alert_email": "ops@x.test",
                               "smtp": {"host": "smtp.x.test", "starttls": value, "tls": value}})
    smtp = CostStage(cfg).spend.notifiers.smtp
    assert (smtp.starttls, smtp.tls) == (expected, expected)


def test_a_smtp_flag_that_is_not_true_or_false_stops_start_up_naming_it():
    cfg = config(MODELS, cost={"alert_threshold_usd": 1, "alert_email": "ops@x.test",
                               "smtp": {"host": "smtp.x.test", "starttls": "ture", "tls": 2}})
    with pytest.raises(ConfigError) as e:
        create_app(cfg)
    assert "cost.smtp.starttls: expected true or false, got 'ture'" in str(e.value)
    assert "cost.smtp.tls: expected true or false, got 2" in str(e.value)


@pytest.mark.parametrize(("cost", "message"), [
    ({"smtp": {"host": "h", "port": 70000}},
     "cost.smtp.port: expected a port number from 1 to 65535, got 70000"),
    ({"smtp": {"host": "h", "port": "25.5"}}, "cost.smtp.port: expected a port number from 1 to 65535"),
    ({"smtp": {"host": "h", "port": 0}}, "cost.smtp.port: expected a port number from 1 to 65535, got 0"),
    ({"alert_retries": 2.5}, "cost.alert_retries: expected a whole number, got 2.5"),
])
def test_a_port_or_retry_count_that_is_not_whole_stops_start_up_naming_it(cost, message):
    # before: port 70000 was taken and every e-mail alert failed at send time; 2.5 retries were 2
    cfg = config(MODELS, cost={"alert_threshold_usd": 1, "alert_email": "ops@x.test", **cost})
    with pytest.raises(ConfigError) as e:
        create_app(cfg)
    assert message in str(e.value)
