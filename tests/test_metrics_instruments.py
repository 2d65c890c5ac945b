"""The call-path recording of the metrics stage, on calls built by hand: which bucket an
observation lands in, what a client that left counts as, and that copying the call-path
sums into the Prometheus metrics never counts anything twice."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from starlette.datastructures import Headers

from aiproxy.builtin.metrics.instruments import MAX_ERROR_CODES, Instruments
from aiproxy.builtin.metrics.settings import MetricsSettings
from aiproxy.call import Call, Principal, Usage
from aiproxy.errors import ProxyError
from tests.metrics_support import Scrape

LABELS = {"provider": "openai", "model": "gpt-4o"}


def made(*, latency: float, first: float | None = None, **metadata: Any) -> Call:
    call = Call(request_id="r", operation="chat", body={}, model="gpt-4o", stream=first is not None,
                headers=Headers())
    call.deployment = SimpleNamespace(name="gpt-4o", provider=SimpleNamespace(name="openai"))  # type: ignore[assignment]
    call.principal = Principal(id="k", tenant="acme")
    call.usage = Usage(10, 5, 15)
    call.started = 0.0  # exact differences: (t + 0.1) - t is not always 0.1
    call.finished = latency
    if first is not None:
        call.first_byte = first
    call.metadata.update(metadata)
    return call


def exposed(instruments: Instruments, registry: CollectorRegistry) -> Scrape:
    instruments.drain()
    return Scrape(generate_latest(registry).decode())


def test_observations_land_in_the_first_bucket_at_or_above_them():
    registry = CollectorRegistry()
    instruments = Instruments(MetricsSettings(latency_buckets=(0.1, 0.5, 2.0), ttft_buckets=(0.05, 1.0)),
                              registry)
    for seconds in (0.05, 0.1, 0.3, 0.5, 1.9, 45.0):  # a bound itself belongs to its bucket (le)
        instruments.answered(made(latency=seconds))
    instruments.answered(made(latency=3.0, first=0.7))
    m = exposed(instruments, registry)
    whole = {**LABELS, "stream": "false"}
    name = "aiproxy_request_duration_seconds_bucket"
    assert [m.value(name, **whole, le=le) for le in ("0.1", "0.5", "2.0", "+Inf")] == [2, 4, 5, 6]
    assert m.value("aiproxy_request_duration_seconds_sum", **whole) == sum((0.05, 0.1, 0.3, 0.5, 1.9, 45.0))
    assert m.value("aiproxy_request_duration_seconds_count", **{**LABELS, "stream": "true"}) == 1
    ttft = "aiproxy_time_to_first_token_seconds_bucket"
    assert [m.value(ttft, **LABELS, le=le) for le in ("0.05", "1.0", "+Inf")] == [0, 1, 1]


def test_draining_again_adds_only_what_came_since():
    registry = CollectorRegistry()
    instruments = Instruments(MetricsSettings(), registry)
    instruments.answered(made(latency=0.2))
    first = exposed(instruments, registry)
    again = exposed(instruments, registry)
    instruments.answered(made(latency=0.2))
    instruments.failed(made(latency=0.2), ProxyError(503, "down"))
    later = exposed(instruments, registry)
    for m, ok, prompt in ((first, 1, 10), (again, 1, 10), (later, 2, 30)):
        assert m.value("aiproxy_requests_total", **LABELS, status="200") == ok
        assert m.value("aiproxy_tokens_total", model="gpt-4o", tenant="acme", type="prompt") == prompt
        assert m.value("aiproxy_request_duration_seconds_count", **LABELS, stream="false") == ok
    assert later.value("aiproxy_requests_total", **LABELS, status="503") == 1


def test_a_client_that_left_mid_stream_counts_499_with_its_first_token_but_no_latency():
    registry = CollectorRegistry()
    instruments = Instruments(MetricsSettings(), registry)
    instruments.answered(made(latency=9.0, first=0.4, client_disconnected=True))
    m = exposed(instruments, registry)
    assert m.value("aiproxy_requests_total", **LABELS, status="499") == 1
    assert m.value("aiproxy_requests_total", **LABELS, status="200") is None
    assert m.value("aiproxy_time_to_first_token_seconds_count", **LABELS) == 1
    assert m.total("aiproxy_request_duration_seconds_count") == 0
    assert m.value("aiproxy_tokens_total", model="gpt-4o", tenant="acme", type="completion") == 5


def test_calls_that_are_not_model_calls_are_not_counted():
    registry = CollectorRegistry()
    instruments = Instruments(MetricsSettings(), registry)
    call = made(latency=0.1)
    call.operation = "count_tokens"
    instruments.failed(call, ProxyError(400, "no"))
    assert exposed(instruments, registry).total("aiproxy_requests_total") == 0


def test_negative_usage_or_cost_from_upstream_is_not_counted_and_breaks_no_scrape():
    registry = CollectorRegistry()
    instruments = Instruments(MetricsSettings(), registry)
    call = made(latency=0.1)
    call.usage = Usage(-5, 7, 2)
    call.cost = -0.5
    instruments.answered(call)
    m = exposed(instruments, registry)
    assert m.value("aiproxy_tokens_total", model="gpt-4o", tenant="acme", type="prompt") is None
    assert m.value("aiproxy_tokens_total", model="gpt-4o", tenant="acme", type="completion") == 7
    assert m.value("aiproxy_cost_usd_total", model="gpt-4o", tenant="acme") is None
    assert m.value("aiproxy_requests_total", **LABELS, status="200") == 1


def test_error_codes_are_labels_up_to_a_bound_and_odd_ones_are_other():
    registry = CollectorRegistry()
    instruments = Instruments(MetricsSettings(), registry)
    for i in range(MAX_ERROR_CODES + 10):  # an upstream inventing codes
        instruments.failed(made(latency=0.1), ProxyError(400, "no", code=f"code_{i}"))
    for code in ("code_0", "Not A Code!", "x" * 65, None):
        instruments.failed(made(latency=0.1), ProxyError(400, "no", code=code))
    m = exposed(instruments, registry)
    codes = m.label_values("aiproxy_errors_total", "code")
    assert codes == {f"code_{i}" for i in range(MAX_ERROR_CODES)} | {"other", ""}
    assert m.value("aiproxy_errors_total", **LABELS, status="400", code="code_0") == 2
    assert m.value("aiproxy_errors_total", **LABELS, status="400", code="other") == 12
    assert m.total("aiproxy_errors_total") == MAX_ERROR_CODES + 14
