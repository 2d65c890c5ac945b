"""The metrics stage in process: exact counts by label after known calls, parsed with
prometheus_client's own parser. Upstreams are the mock provider (deterministic usage,
per-deployment faults) and respx; auth, cost and cache are small stand-in stages."""

from __future__ import annotations

from typing import Any

import pytest

from aiproxy.app import create_app
from aiproxy.plugins import PluginError
from tests.conftest import CHAT, OPENAI_BASE, make_config
from tests.helpers import with_plugins
from tests.metrics_support import STAGES, Cache, Pricing, Scrape, Stats, Tenants, scrape

MASTER = "sk-master-metrics-test"
SCRAPER = "scrape-token-0123456789"


def hi(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi"}], **extra}


def key(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def config(*, models: list[dict[str, Any]] | None = None, metrics: dict[str, Any] | None = None,
           server: dict[str, Any] | None = None) -> Any:
    overrides: dict[str, Any] = {"plugins": {"dir": None, "disable": STAGES}}
    if models is not None:
        overrides["models"] = models
    if metrics is not None:
        overrides["metrics"] = metrics
    if server is not None:
        overrides["server"] = server
    return make_config(**overrides)


async def test_whole_and_streamed_calls_count_requests_tokens_and_histograms(gateway):
    cfg = config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, tenants=Tenants("acme", "globex"))) as (http, _):
        used = {"acme": [0, 0], "globex": [0, 0]}
        for tenant, body in [("acme", hi("mock-a")), ("acme", hi("mock-a", max_tokens=5)),
                             ("globex", hi("mock-a", mock={"tokens": 30}))]:
            r = await http.post("/v1/chat/completions", json=body, headers=key(f"sk-{tenant}"))
            assert r.status_code == 200, r.text
            used[tenant][0] += r.json()["usage"]["prompt_tokens"]
            used[tenant][1] += r.json()["usage"]["completion_tokens"]
        r = await http.post("/v1/chat/completions", headers={"authorization": "Bearer sk-acme"},
                            json=hi("mock-a", stream=True, stream_options={"include_usage": True}))
        assert r.status_code == 200
        last = [line for line in r.text.splitlines() if '"usage"' in line and '"prompt_tokens"' in line][-1]
        import orjson

        usage = orjson.loads(last.removeprefix("data: "))["usage"]
        used["acme"][0] += usage["prompt_tokens"]
        used["acme"][1] += usage["completion_tokens"]
        m = await scrape(http)

    assert m.value("aiproxy_requests_total", provider="mock", model="mock-a", status="200") == 4
    assert m.total("aiproxy_requests_total") == 4
    for tenant, (prompt, completion) in used.items():
        assert prompt and completion
        assert m.value("aiproxy_tokens_total", model="mock-a", tenant=tenant, type="prompt") == prompt
        assert m.value("aiproxy_tokens_total", model="mock-a", tenant=tenant, type="completion") == completion
    assert m.types["aiproxy_request_duration_seconds"] == "histogram"
    whole = {"provider": "mock", "model": "mock-a", "stream": "false"}
    assert m.value("aiproxy_request_duration_seconds_count", **whole) == 3
    assert m.value("aiproxy_request_duration_seconds_bucket", **whole, le="+Inf") == 3
    assert m.value("aiproxy_request_duration_seconds_bucket", **whole, le="600.0") == 3
    assert m.value("aiproxy_request_duration_seconds_sum", **whole) > 0
    assert m.value("aiproxy_request_duration_seconds_count", **{**whole, "stream": "true"}) == 1
    assert m.value("aiproxy_time_to_first_token_seconds_count", provider="mock", model="mock-a") == 1
    assert m.value("aiproxy_cost_usd_total", model="mock-a", tenant="acme") is None  # nothing priced
    assert "_created" not in m.text
    assert m.types["process_resident_memory_bytes"] == "gauge"  # one process: its own too


async def test_errors_count_by_status_and_an_unrouted_model_makes_no_series(gateway):
    cfg = config()
    async with gateway(cfg) as (http, upstream):
        upstream.post(f"{OPENAI_BASE}/chat/completions").respond(
            400, json={"error": {"message": "bad temperature", "type": "invalid_request_error"}})
        assert (await http.post("/v1/chat/completions", json={"model": "mock-a"})).status_code == 400
        for i in range(3):  # a client inventing model names
            r = await http.post("/v1/chat/completions", json=hi(f"no-such-model-{i}"))
            assert r.status_code == 404
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 400  # upstream's 400
        r = await http.post("/v1/chat/completions", json=hi("mock-a", mock={"error": 429, "retry_after": 3}))
        assert r.status_code == 429
        r = await http.post("/v1/chat/completions", json=hi("mock-a", mock={"error": 500}))
        assert r.status_code == 502
        # a stream that fails after its first chunks: the client got 200, then an error event
        r = await http.post("/v1/chat/completions", json=hi("mock-a", stream=True, mock={"error_after": 3}))
        assert r.status_code == 200 and '"error"' in r.text
        m = await scrape(http)

    assert m.value("aiproxy_requests_total", provider="", model="", status="400") == 1  # never routed
    assert m.value("aiproxy_requests_total", provider="", model="", status="404") == 3
    assert "no-such-model" not in m.text
    assert m.value("aiproxy_requests_total", provider="openai", model="gpt-test", status="400") == 1
    # mock-a never got an answer, so its errors count under the entry's name, mock-*
    assert m.value("aiproxy_requests_total", provider="mock", model="mock-*", status="429") == 1
    assert m.value("aiproxy_requests_total", provider="mock", model="mock-*", status="502") == 2
    assert m.total("aiproxy_requests_total") == 8
    assert m.total("aiproxy_requests_total", status="200") == 0
    # the cut stream had a first token and spent (estimated) tokens; failures have no latency
    assert m.value("aiproxy_time_to_first_token_seconds_count", provider="mock", model="mock-*") == 1
    assert m.value("aiproxy_tokens_total", model="mock-*", tenant="", type="prompt") > 0
    assert m.total("aiproxy_request_duration_seconds_count") == 0
    assert m.label_values("aiproxy_requests_total", "model") == {"", "gpt-test", "mock-*"}
    # errors again, by their code
    assert m.total("aiproxy_errors_total") == 8
    assert m.value("aiproxy_errors_total", provider="", model="", status="404", code="model_not_found") == 3
    assert m.value("aiproxy_errors_total", provider="mock", model="mock-*", status="429",
                   code="rate_limit_exceeded") == 1
    assert m.value("aiproxy_errors_total", provider="mock", model="mock-*", status="502",
                   code="upstream_error") == 2
    assert m.value("aiproxy_errors_total", provider="openai", model="gpt-test", status="400", code="") == 1


async def test_wildcard_names_are_series_once_served_and_at_most_max_wildcard_models(gateway):
    cfg = config(metrics={"max_wildcard_models": 2})
    async with gateway(cfg) as (http, _):
        r = await http.post("/v1/chat/completions", json=hi("mock-x", mock={"error": 503}))
        assert r.status_code == 503
        for name in ("mock-a", "mock-b", "mock-c", "mock-a"):
            assert (await http.post("/v1/chat/completions", json=hi(name))).status_code == 200
        r = await http.post("/v1/chat/completions", json=hi("mock-b", mock={"error": 503}))
        assert r.status_code == 503
        m = await scrape(http)

    assert m.value("aiproxy_requests_total", provider="mock", model="mock-a", status="200") == 2
    assert m.value("aiproxy_requests_total", provider="mock", model="mock-b", status="200") == 1
    assert m.value("aiproxy_requests_total", provider="mock", model="mock-b", status="503") == 1
    assert m.value("aiproxy_requests_total", provider="mock", model="mock-*", status="200") == 1  # mock-c
    assert m.value("aiproxy_requests_total", provider="mock", model="mock-*", status="503") == 1  # mock-x
    assert m.label_values("aiproxy_tokens_total", "model") == {"mock-a", "mock-b", "mock-*"}


ROUTED = [
    # a pool of two failing deployments: the second attempt is a retry, each failure a cooldown
    {"name": "pool", "provider": "mock", "id": "bad-1", "retries": 1, "cooldown": {"failures": 1},
     "options": {"error": 500}},
    {"name": "pool", "provider": "mock", "id": "bad-2", "options": {"error": 500}},
    # a failing model that falls back to a working one
    {"name": "primary", "provider": "mock", "id": "primary", "fallbacks": ["spare"], "cooldown": False,
     "options": {"error": 503}},
    {"name": "spare", "provider": "openai", "model": "gpt-4o-mini", "id": "spare"},
]


async def test_retries_fallbacks_cooldowns_and_attempts_come_from_the_router(gateway):
    cfg = config(models=ROUTED)
    async with gateway(cfg) as (http, upstream):
        upstream.post(f"{OPENAI_BASE}/chat/completions").respond(json={
            "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}})
        r = await http.post("/v1/chat/completions", json=hi("pool"))
        assert r.status_code == 502 and r.headers["x-aiproxy-attempts"] == "2"
        for _ in range(2):
            r = await http.post("/v1/chat/completions", json=hi("primary"))
            assert r.status_code == 200 and r.headers["x-aiproxy-deployment"] == "spare"
        m = await scrape(http)

    assert m.value("aiproxy_upstream_retries_total") == 1
    assert m.value("aiproxy_upstream_exhausted_total") == 1
    assert m.value("aiproxy_upstream_cooldowns_total") == 2
    assert m.value("aiproxy_upstream_fallbacks_total") == 2
    assert m.value("aiproxy_upstream_attempts_total", deployment="bad-1", result="failure") == 1
    assert m.value("aiproxy_upstream_attempts_total", deployment="bad-2", result="failure") == 1
    assert m.value("aiproxy_upstream_attempts_total", deployment="primary", result="failure") == 2
    assert m.value("aiproxy_upstream_attempts_total", deployment="spare", result="success") == 2
    # the call is counted where it ended: the pool's last deployment, the fallback that served
    assert m.value("aiproxy_requests_total", provider="mock", model="pool", status="502") == 1
    assert m.value("aiproxy_requests_total", provider="openai", model="spare", status="200") == 2
    assert m.value("aiproxy_tokens_total", model="spare", tenant="", type="prompt") == 22


async def test_router_counters_are_read_at_each_scrape(gateway):
    cfg = config(models=ROUTED)
    async with gateway(cfg) as (http, _):
        assert (await scrape(http)).value("aiproxy_upstream_retries_total") == 0
        assert (await http.post("/v1/chat/completions", json=hi("pool"))).status_code == 502
        assert (await scrape(http)).value("aiproxy_upstream_retries_total") == 1
        assert (await scrape(http)).value("aiproxy_upstream_retries_total") == 1  # copied once, not again


async def test_cache_hits_misses_and_skips_by_model(gateway):
    cfg = config()
    async with gateway(cfg, plugin_manager=with_plugins(cfg, fake_cache=Cache())) as (http, _):
        upstream_prompt = 0
        for user in ("cached", "cached", "cached", "fresh", "nocache"):
            r = await http.post("/v1/chat/completions", json=hi("mock-a", user=user))
            assert r.status_code == 200
            if user != "cached":
                upstream_prompt += r.json()["usage"]["prompt_tokens"]
        r = await http.post("/v1/chat/completions", json=hi("mock-a", user="cached", stream=True))
        assert "from the cache" in r.text
        m = await scrape(http)

    assert m.value("aiproxy_cache_requests_total", model="mock-a", result="hit") == 4
    assert m.value("aiproxy_cache_requests_total", model="mock-a", result="miss") == 1
    assert m.value("aiproxy_cache_requests_total", model="mock-a", result="skip") == 1
    assert m.value("aiproxy_requests_total", provider="mock", model="mock-a", status="200") == 6
    # hits spent no upstream tokens and are not upstream latency
    assert m.value("aiproxy_tokens_total", model="mock-a", tenant="", type="prompt") == upstream_prompt
    whole = {"provider": "mock", "model": "mock-a", "stream": "false"}
    assert m.value("aiproxy_request_duration_seconds_count", **whole) == 2
    assert m.value("aiproxy_time_to_first_token_seconds_count", provider="mock", model="mock-a") is None


async def test_cost_by_model_and_tenant_as_the_cost_stage_set_it(gateway):
    cfg = config()
    pm = with_plugins(cfg, tenants=Tenants("acme", "globex"), pricing=Pricing(0.0001), fake_cache=Cache())
    async with gateway(cfg, plugin_manager=pm) as (http, _):
        spent = {"acme": 0.0, "globex": 0.0}
        for tenant, body in [("acme", hi("mock-a")), ("acme", hi("mock-b")), ("globex", hi("mock-a")),
                             ("globex", hi("mock-a", user="cached"))]:
            r = await http.post("/v1/chat/completions", json=body, headers=key(f"sk-{tenant}"))
            if body.get("user") != "cached" and body["model"] == "mock-a":
                spent[tenant] += r.json()["usage"]["total_tokens"] * 0.0001
        m = await scrape(http)

    for tenant in ("acme", "globex"):
        cost = m.value("aiproxy_cost_usd_total", model="mock-a", tenant=tenant)
        assert cost == pytest.approx(spent[tenant])
    assert m.value("aiproxy_cost_usd_total", model="mock-b", tenant="acme") > 0
    assert m.types["aiproxy_cost_usd"] == "counter"


async def test_plugin_stats_are_exported_counters_and_gauges(gateway, caplog):
    cfg = config()
    stats = Stats({"aiproxy_test_widgets_total": 3, "aiproxy_test_queue_depth": 7.5,
                   "not a name": 1, "aiproxy_requests_total": 99, "aiproxy_test_bad": "x"})
    broken = Stats(RuntimeError("boom"))
    async with gateway(cfg, plugin_manager=with_plugins(cfg, stats=stats, broken=broken)) as (http, _):
        m = await scrape(http)
        assert m.types["aiproxy_test_widgets"] == "counter"
        assert m.value("aiproxy_test_widgets_total") == 3
        assert m.types["aiproxy_test_queue_depth"] == "gauge"
        assert m.value("aiproxy_test_queue_depth") == 7.5
        assert m.value("aiproxy_requests_total") is None  # a plugin cannot write the gateway's own
        assert m.value("aiproxy_test_bad") is None
        stats.values = {"aiproxy_test_widgets_total": 10, "aiproxy_test_queue_depth": 2}
        m = await scrape(http)
        assert m.value("aiproxy_test_widgets_total") == 10
        assert m.value("aiproxy_test_queue_depth") == 2
        stats.values = {"aiproxy_test_widgets_total": 4}  # the plugin's count was reset
        m = await scrape(http)
        assert m.value("aiproxy_test_widgets_total") == 14  # a counter never goes down
    assert "'not a name' is not a Prometheus name" in caplog.text
    assert "aiproxy_stats of plugin 'broken' failed" in caplog.text
    assert caplog.text.count("aiproxy_stats of plugin 'broken' failed") == 1  # once, not every scrape


# ---------------------------------------------------------------- access

async def test_metrics_need_the_master_key_or_the_scrape_token_when_there_is_a_master_key(gateway):
    cfg = config(server={"master_key": MASTER}, metrics={"key": SCRAPER})
    async with gateway(cfg) as (http, _):
        r = await http.get("/metrics")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        error = r.json()["error"]
        assert "metrics.key" in error["message"] and error["code"] == "invalid_api_key"
        assert (await http.get("/metrics", headers={"authorization": "Bearer sk-wrong"})).status_code == 401
        assert (await http.get("/metrics", headers={"authorization": f"Basic {MASTER}"})).status_code == 401
        for token in (MASTER, SCRAPER):
            r = await http.get("/metrics", headers=key(token))
            assert r.status_code == 200 and "aiproxy_requests_total" in r.text
            assert token not in r.text
        # the scrape token is no API key
        r = await http.post("/v1/chat/completions", json=hi("mock-a"), headers=key(SCRAPER))
        assert r.status_code == 401
        assert (await http.get("/v1/metrics")).status_code == 404  # not under /v1


async def test_require_key_false_opens_metrics_and_no_master_key_means_open_by_default(gateway):
    cfg = config(server={"master_key": MASTER}, metrics={"require_key": False})
    async with gateway(cfg) as (http, _):
        assert (await http.get("/metrics")).status_code == 200
    async with gateway(config()) as (http, _):  # loopback-only gateway with no key at all
        assert (await http.get("/metrics")).status_code == 200
    cfg = config(metrics={"key": SCRAPER})  # a scrape token alone: required by default
    async with gateway(cfg) as (http, _):
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"authorization": f"Bearer {SCRAPER}"})).status_code == 200


async def test_metrics_path_is_configurable(gateway):
    async with gateway(config(metrics={"path": "/internal/metrics/"})) as (http, _):
        assert (await http.get("/internal/metrics")).status_code == 200
        r = await http.get("/internal/metrics", headers={"accept": "application/openmetrics-text"})
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.endswith("# EOF\n")
        assert (await http.get("/metrics")).status_code == 404


@pytest.mark.parametrize(("metrics", "message"), [
    ({"require_key": True}, "metrics.require_key: true, but no key could be accepted"),
    ({"require_key": "sometimes"}, "metrics.require_key: expected true or false"),
    ({"path": "/v1/metrics"}, "metrics.path: '/v1/metrics' is under /v1"),
    ({"path": "metrics"}, "metrics.path: expected a path like /metrics"),
    ({"path": "//"}, "metrics.path: expected a path like /metrics"),  # was a bare AssertionError
    ({"path": "/metrics?x=1"}, "metrics.path: expected a path like /metrics"),  # a route nobody reaches
    ({"path": "/metrics/{x}"}, "metrics.path: expected a path like /metrics"),  # a route pattern
    ({"latency_buckets": [1, 0.5]}, "metrics.latency_buckets: bounds must increase"),
    ({"ttft_buckets": [0.1, "soon"]}, "metrics.ttft_buckets[1]: expected a number above 0"),
    ({"max_wildcard_models": 2.5}, "metrics.max_wildcard_models: expected a whole number"),
    ({"sync_interval": 0}, "metrics.sync_interval: expected a number above 0"),
    ({"requirekey": True}, "metrics.requirekey: unknown setting"),
])
def test_bad_metrics_settings_stop_startup_naming_the_setting(metrics, message):
    with pytest.raises(PluginError) as caught:
        create_app(config(metrics=metrics))
    assert message in str(caught.value)


def test_the_scrape_token_is_not_in_the_settings_repr():
    app = create_app(config(metrics={"key": SCRAPER}))
    plugin = app.state.plugin_manager.get_plugin("metrics")
    assert SCRAPER not in repr(plugin.settings)


def test_scrape_parses_what_it_is_given():  # the helper the assertions above rest on
    m = Scrape('# TYPE a_total counter\na_total{x="1"} 2\na_total{x="2"} 3\n')
    assert m.value("a_total", x="1") == 2 and m.total("a_total") == 5 and m.value("a_total") is None


async def test_the_real_cache_and_cost_stages_feed_the_metrics(gateway):
    cfg = make_config(plugins={"dir": None}, cost={"free_providers": []},
                      models=[{"name": "mock-*", "provider": "mock", "price": {"input": 1, "output": 2}}])
    async with gateway(cfg) as (http, _):
        said = []
        for _ in range(3):  # temperature 0: cached after the first
            r = await http.post("/v1/chat/completions", json=hi("mock-a", temperature=0))
            assert r.status_code == 200
            said.append(r.headers["x-aiproxy-cache"])
        first = r.json()["usage"]
        m = await scrape(http)
    assert said == ["miss", "hit", "hit"]
    assert m.value("aiproxy_cache_requests_total", model="mock-a", result="miss") == 1
    assert m.value("aiproxy_cache_requests_total", model="mock-a", result="hit") == 2
    # priced once (hits cost 0): input $1 and output $2 per million tokens
    expected = (first["prompt_tokens"] * 1 + first["completion_tokens"] * 2) / 1e6
    assert m.value("aiproxy_cost_usd_total", model="mock-a", tenant="") == pytest.approx(expected)
    assert m.value("aiproxy_cache_hits_total") == 2  # the cache stage's own, through aiproxy_stats
