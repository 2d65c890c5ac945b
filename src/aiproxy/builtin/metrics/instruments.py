"""The per-call metrics and how one call is recorded: in-memory increments only.

A call adds to plain dicts (about a microsecond; a prometheus-client increment takes a
lock per value, and under several workers writes a shared file); :meth:`Instruments.drain`
moves the sums into the Prometheus metrics at each scrape and, with several workers,
every ``sync_interval`` seconds.

Every label value comes from config or keys, never from what a client may write
freely: ``provider`` and ``model`` are those of the deployment that served (a model
name that does not route never gets this far), ``tenant`` is the key's. A wildcard
entry (``claude-*``) would let a client mint names, so a name it matched becomes its
own series only once an upstream has answered to it, and at most
``max_wildcard_models`` of them; past that, or before, it counts as the entry's name.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

from aiproxy.call import OPERATIONS

if TYPE_CHECKING:
    from aiproxy.builtin.metrics.settings import MetricsSettings
    from aiproxy.call import Call
    from aiproxy.errors import ProxyError
    from aiproxy.router import Deployment

_OPERATIONS = frozenset(OPERATIONS)
_CODE = re.compile(r"[a-z0-9_.]{1,64}")
MAX_ERROR_CODES = 50
_STATUS = {status: str(status) for status in range(100, 600)}
#: the cache stage's x-aiproxy-cache values; any other counts as "skip"
_CACHE_RESULTS = {"hit": "hit", "miss": "miss", "skip": "skip"}


class _Tally:
    """A counter's increments since the last copy, by label values: plain dict arithmetic
    on the call path; :meth:`drain` hands them to the Prometheus metric off it."""

    __slots__ = ("_metric", "pending")

    def __init__(self, metric: Counter) -> None:
        self._metric = metric
        self.pending: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        pending = self.pending
        pending[labels] = pending.get(labels, 0.0) + amount

    def drain(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, amount in pending.items():
            self._metric.labels(*labels).inc(amount)


class _Spread:
    """A histogram's observations since the last copy: per label values, a count per
    bucket and the sum."""

    __slots__ = ("_bounds", "_metric", "pending")

    def __init__(self, metric: Histogram, bounds: tuple[float, ...]) -> None:
        self._metric = metric
        self._bounds = bounds
        self.pending: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        row = self.pending.get(labels)
        if row is None:  # a count per bound, one for +Inf, then the sum
            row = self.pending[labels] = [0.0] * (len(self._bounds) + 2)
        row[bisect_left(self._bounds, seconds)] += 1
        row[-1] += seconds

    def drain(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, row in pending.items():
            child = self._metric.labels(*labels)
            # prometheus-client has no "observe n at once": its child keeps one value per
            # bucket (not cumulative; summed when collected) and the sum; add to those
            for bucket, count in zip(child._buckets, row, strict=False):
                if count:
                    bucket.inc(count)
            child._sum.inc(row[-1])


class Instruments:
    """The metrics of one app: what a call adds on the call path, and :meth:`drain`."""

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...]) -> _Tally:
            return _Tally(Counter(name, doc, labels, registry=registry))

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> _Spread:
            return _Spread(Histogram(name, doc, labels, buckets=buckets, registry=registry), buckets)

        self.requests = counter("aiproxy_requests_total", "Calls answered, by the provider and model that "
                                "served (or were to serve) them and the HTTP status the client got.",
                                ("provider", "model", "status"))
        self.errors = counter("aiproxy_errors_total", "Calls that ended in an error, by its code "
                              "(rate_limit_exceeded, budget_exceeded, upstream_timeout, ...).",
                              ("provider", "model", "status", "code"))
        self.tokens = counter("aiproxy_tokens_total", "Tokens sent to and produced by upstreams "
                              "(cache hits excluded).", ("model", "tenant", "type"))
        self.cost = counter("aiproxy_cost_usd_total", "What calls cost in USD, as the cost stage "
                            "priced them.", ("model", "tenant"))
        self.cache = counter("aiproxy_cache_requests_total", "Answers by what the cache stage said: "
                             "hit, miss, skip.", ("model", "result"))
        self.latency = histogram("aiproxy_request_duration_seconds", "Seconds from arrival to the last "
                                 "byte of calls answered by an upstream.", ("provider", "model", "stream"),
                                 settings.latency_buckets)
        self.ttft = histogram("aiproxy_time_to_first_token_seconds", "Seconds from arrival to a stream's "
                              "first chunk (streams answered by an upstream).", ("provider", "model"),
                              settings.ttft_buckets)
        self._all = (self.requests, self.errors, self.tokens, self.cost, self.cache, self.latency, self.ttft)
        self.names = frozenset({"aiproxy_requests_total", "aiproxy_errors_total", "aiproxy_tokens_total",
                                "aiproxy_cost_usd_total", "aiproxy_cache_requests_total",
                                "aiproxy_request_duration_seconds", "aiproxy_time_to_first_token_seconds"})
        self.max_wildcard_models = settings.max_wildcard_models
        self._named: set[str] = set()  # names a wildcard entry served under their own label
        self._codes: set[str] = set()  # error codes seen; an upstream's are its own words

    def drain(self) -> None:
        """Hand what calls added since the last time to the Prometheus metrics."""
        for metric in self._all:
            metric.drain()

    # ------------------------------------------------------------ the two hooks
    def answered(self, call: Call) -> None:
        """A call with its answer (after-call)."""
        d = call.deployment
        provider = d.provider.name if d is not None else ""
        model = self.model_label(call, d, served=True)
        disconnected = bool(call.metadata.get("client_disconnected"))
        self.requests.add((provider, model, "499" if disconnected else "200"))
        if call.cached:
            self.cache.add((model, "hit"))
            return  # no upstream tokens, no upstream latency
        result = call.response_headers.get("x-aiproxy-cache")
        if result is not None:
            self.cache.add((model, _CACHE_RESULTS.get(result.lower(), "skip")))
        self._spend(call, model)
        started = call.started
        if call.first_byte is not None:
            self.ttft.observe((provider, model), call.first_byte - started)
        if call.finished is not None and not disconnected:
            stream = "true" if call.stream else "false"
            self.latency.observe((provider, model, stream), call.finished - started)

    def failed(self, call: Call, error: ProxyError) -> None:
        """A call that ended in an error (on-error); a stream cut short still spent tokens."""
        if call.operation not in _OPERATIONS:
            return  # count_tokens, model listings, management: not calls of an upstream
        d = call.deployment
        provider = d.provider.name if d is not None else ""
        model = self.model_label(call, d, served=False)
        status = _STATUS.get(error.status) or str(error.status)
        self.requests.add((provider, model, status))
        self.errors.add((provider, model, status, self.code_label(error.code)))
        if not call.cached:
            self._spend(call, model)
            if call.first_byte is not None:
                self.ttft.observe((provider, model), call.first_byte - call.started)

    def _spend(self, call: Call, model: str) -> None:
        principal = call.principal
        tenant = (principal.tenant or "") if principal is not None else ""
        usage = call.usage
        if usage is not None:  # an upstream may say anything: a counter cannot go down
            if usage.prompt_tokens > 0:
                self.tokens.add((model, tenant, "prompt"), usage.prompt_tokens)
            if usage.completion_tokens > 0:
                self.tokens.add((model, tenant, "completion"), usage.completion_tokens)
        cost = call.cost
        if cost is not None and cost > 0:
            self.cost.add((model, tenant), cost)

    # ------------------------------------------------------------ labels
    def code_label(self, code: str | None) -> str:
        """An error's code; the gateway's and its plugins' are a few dozen words, but an
        upstream's 4xx passes its own on: past ``MAX_ERROR_CODES`` distinct ones, "other"."""
        if not code:
            return ""
        if code in self._codes:
            return code
        if len(self._codes) < MAX_ERROR_CODES and _CODE.fullmatch(code):
            self._codes.add(code)
            return code
        return "other"

    def model_label(self, call: Call, d: Deployment | None, *, served: bool) -> str:
        """The configured name that served the call: no series for a name nobody routes."""
        if d is None:
            return ""
        entry = d.name
        if "*" not in entry:
            return entry
        name = call.metadata.get("fallback") or call.model
        if not isinstance(name, str) or not _matches(entry, name):
            return entry
        if name in self._named:
            return name
        if served and len(self._named) < self.max_wildcard_models:
            self._named.add(name)
            return name
        return entry


def _matches(pattern: str, name: str) -> bool:
    prefix, _, suffix = pattern.partition("*")
    return len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix)

