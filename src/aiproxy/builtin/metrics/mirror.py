"""Counts kept elsewhere, copied into the Prometheus metrics: the calls' own (added up
in plain dicts on the call path), the router's, and other plugins'.

The router counts retries, fallbacks and cooldowns in plain integers
(``router.stats``), and a plugin reports its counters through ``aiproxy_stats``. Both
are read here, never on the call path: at each scrape (so one process's answer is
exact) and, with several workers, once every ``sync_interval`` seconds in each worker,
so that its numbers reach the shared multiprocess files whichever worker is scraped.
A counter grows by what it grew since the last copy (a count that went down was
reset: it grows by the whole new value); a gauge is set (several workers: summed).
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from aiproxy.builtin.metrics.instruments import Instruments
    from aiproxy.config import Config
    from aiproxy.hooks import Hooks
    from aiproxy.router import RoutingStats

log = logging.getLogger("aiproxy.metrics")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
#: RoutingStats field → (metric, help)
_ROUTING = {
    "retries": ("aiproxy_upstream_retries_total", "Attempts after the first within a model's pool."),
    "fallbacks": ("aiproxy_upstream_fallbacks_total", "Moves of a call to a fallback model."),
    "cooldowns": ("aiproxy_upstream_cooldowns_total", "Deployments taken out after repeated failures."),
    "exhausted": ("aiproxy_upstream_exhausted_total", "Calls that failed after more than one attempt."),
}
ATTEMPTS = "aiproxy_upstream_attempts_total"


class Mirror:
    """Copies ``router.stats`` and every plugin's ``aiproxy_stats`` into metrics."""

    def __init__(self, registry: CollectorRegistry, instruments: Instruments, stats: RoutingStats,
                 hooks: Hooks, config: Config) -> None:
        self._registry = registry
        self._instruments = instruments
        self._stats = stats
        self._hooks = hooks
        self._config = config
        self._reserved = instruments.names | {name for name, _ in _ROUTING.values()} | {ATTEMPTS}
        self._routing = {field: Counter(name, doc, registry=registry)
                         for field, (name, doc) in _ROUTING.items()}
        self._attempts = Counter(ATTEMPTS, "Upstream attempts by deployment and result (success, failure).",
                                 ("deployment", "result"), registry=registry)
        self._seen: dict[Any, float] = {}  # what each counter was at the last copy
        self._plugin_metrics: dict[str, Any] = {}  # stats name → Counter / Gauge
        self._owner: dict[str, str] = {}  # stats name → the plugin that reported it first
        self._refused: set[str] = set()  # names warned about once

    def sync(self) -> None:
        """Copy everything in: the calls' own counts, the router's, the plugins'."""
        self._instruments.drain()
        stats = self._stats
        for field, metric in self._routing.items():
            self._grow(metric, ("routing", field), getattr(stats, field))
        for result, counts in (("success", stats.served), ("failure", stats.failures)):
            for deployment, value in list(counts.items()):
                key = (result, deployment)
                if value != self._seen.get(key, 0):
                    self._grow(self._attempts.labels(deployment, result), key, value)
        for plugin in self._hooks.implementers("aiproxy_stats"):
            try:
                values = self._hooks.sync_one("aiproxy_stats", plugin, config=self._config)
            except Exception:
                self._warn(f"plugin:{plugin}", "aiproxy_stats of plugin %r failed", plugin, exc_info=True)
                continue
            if not isinstance(values, dict):
                if values is not None:
                    self._warn(f"plugin:{plugin}", "aiproxy_stats of plugin %r returned %s, not a dict",
                               plugin, type(values).__name__)
                continue
            for name, value in values.items():
                self._plugin_value(plugin, name, value)

    def _plugin_value(self, plugin: str, name: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self._warn(f"{plugin}:{name}", "aiproxy_stats of plugin %r: %s is %r, not a number",
                       plugin, name, value)
            return
        metric = self._plugin_metrics.get(name)
        if metric is None or self._owner.get(name) != plugin:
            metric = self._plugin_metric(plugin, name)
            if metric is None:
                return
        if isinstance(metric, Counter):
            if value < 0:
                self._warn(f"{plugin}:{name}", "aiproxy_stats of plugin %r: counter %s is negative (%r)",
                           plugin, name, value)
                return
            self._grow(metric, ("stats", name), value)
        else:
            metric.set(value)

    def _plugin_metric(self, plugin: str, name: Any) -> Any | None:
        if name in self._owner:
            if self._owner[name] != plugin:
                self._warn(f"{plugin}:{name}", "aiproxy_stats: %s from plugin %r is ignored: plugin %r "
                           "reports it", name, plugin, self._owner[name])
            return None
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in self._reserved \
                or name.removesuffix("_total") in self._reserved:
            self._warn(f"{plugin}:{name}", "aiproxy_stats of plugin %r: %r is not a Prometheus name "
                       "aiproxy may use; ignored", plugin, name)
            return None
        doc = f"Reported by plugin {plugin!r} (aiproxy_stats)."
        try:
            if name.endswith("_total"):
                metric: Any = Counter(name, doc, registry=self._registry)
            else:
                metric = Gauge(name, doc, registry=self._registry, multiprocess_mode="livesum")
        except ValueError as exc:  # clashes with a metric already registered
            self._warn(f"{plugin}:{name}", "aiproxy_stats of plugin %r: %s ignored: %s", plugin, name, exc)
            return None
        self._owner[name] = plugin
        self._plugin_metrics[name] = metric
        return metric

    def _grow(self, metric: Any, key: Any, value: float) -> None:
        last = self._seen.get(key, 0)
        if value == last:
            return
        metric.inc(value - last if value > last else value)
        self._seen[key] = value

    def _warn(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key in self._refused:
            return
        self._refused.add(key)
        log.warning(message, *args, exc_info=exc_info)
