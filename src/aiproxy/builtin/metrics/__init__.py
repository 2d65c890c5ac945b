"""The metrics stage: ``GET /metrics`` in the Prometheus text format.

After-call and on-error record each call with in-memory increments only (see
:mod:`.instruments`); the router's counters and other plugins' ``aiproxy_stats`` are
copied in off the call path (see :mod:`.mirror`).

Several workers (``aiproxy serve --workers N``) are one gateway to Prometheus: the
CLI gives the run a fresh ``PROMETHEUS_MULTIPROC_DIR`` before the workers start,
prometheus-client keeps each worker's values in files there, and whichever worker
is scraped answers for all of them. Without that variable a process answers for
itself (and adds the ``process_*`` metrics).

``/metrics`` needs a key when ``metrics.require_key`` is true — by default when the
gateway has a master key or ``metrics.key`` is set: the master key or ``metrics.key``
(a scrape-only token for Prometheus, which cannot call a model) as a bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from aiproxy import hookimpl
from aiproxy.builtin.auth import presented_key
from aiproxy.builtin.metrics.instruments import Instruments
from aiproxy.builtin.metrics.mirror import Mirror
from aiproxy.builtin.metrics.settings import MetricsSettings, parse_settings
from aiproxy.call import Call
from aiproxy.config import Config
from aiproxy.errors import ProxyError
from aiproxy.gateway import error_response, request_id

log = logging.getLogger("aiproxy.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The shared directory when this process is one of several workers, else None."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        log.warning("%s is set, but after prometheus_client was imported: this process's metrics "
                    "stay its own", MULTIPROC_ENV)
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{MULTIPROC_ENV}={path!r} is not a directory")
    return path


@dataclass(slots=True)
class _Live:
    """What exists while the app runs."""

    registry: CollectorRegistry
    instruments: Instruments
    mirror: Mirror
    shared: str | None  # the multiprocess directory
    syncer: asyncio.Task[None] | None = None


class Metrics:
    """The stage of one app: its settings from config; its metrics from start-up on."""

    def __init__(self, config: Config) -> None:
        self.settings: MetricsSettings = parse_settings(config.section("metrics"), config.server.master_key)
        master = config.server.master_key
        self._keys = tuple(k.encode() for k in (master, self.settings.key) if k)
        self.live: _Live | None = None

    # ------------------------------------------------------------ lifecycle
    @hookimpl
    def aiproxy_routes(self) -> list[BaseRoute]:
        return [Route(self.settings.path, self.scrape, methods=["GET"])]

    @hookimpl
    async def aiproxy_startup(self, app: Starlette, config: Config) -> None:
        shared = multiprocess_dir()
        disable_created_metrics()  # a *_created series per series: twice the series, no use here
        registry = CollectorRegistry()
        if shared is None:
            ProcessCollector(registry=registry)
        instruments = Instruments(self.settings, registry)
        gateway = app.state.gateway
        mirror = Mirror(registry, instruments, gateway.router.stats, app.state.hooks, config)
        self.live = live = _Live(registry, instruments, mirror, shared)
        if shared is not None:
            live.syncer = asyncio.create_task(self._sync_every(mirror, self.settings.sync_interval))

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        live, self.live = self.live, None
        if live is None:
            return
        if live.syncer is not None:
            live.syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.syncer
        if live.shared is not None:
            try:
                live.mirror.sync()  # this worker's last counts reach the shared files
            except Exception:
                log.exception("copying the last counts into metrics failed")
            mark_process_dead(os.getpid(), live.shared)  # its gauges stop counting

    async def _sync_every(self, mirror: Mirror, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                mirror.sync()
            except Exception:
                log.exception("copying stats into metrics failed")

    # ------------------------------------------------------------ the stage
    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        if self.live is not None:
            self.live.instruments.answered(call)

    @hookimpl
    def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        if self.live is not None:
            self.live.instruments.failed(call, error)

    # ------------------------------------------------------------ /metrics
    async def scrape(self, request: Request) -> Response:
        if self.settings.require_key and not self._allowed(request):
            return error_response(ProxyError(
                401, f"{self.settings.path} needs the master key or metrics.key: send "
                "'Authorization: Bearer <key>' (Prometheus: authorization.credentials).",
                type="authentication_error", code="invalid_api_key",
                headers={"www-authenticate": 'Bearer realm="aiproxy metrics"'}), request_id(request))
        live = self.live
        if live is None:
            return error_response(ProxyError(503, "The gateway is starting; metrics are not ready.",
                                             type="service_unavailable", code="starting",
                                             headers={"retry-after": "1"}), request_id(request))
        try:
            live.mirror.sync()
        except Exception:  # what was copied before still answers
            log.exception("copying counts into metrics failed")
        registry = live.registry
        if live.shared is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, live.shared)
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), headers={"content-type": content_type})

    def _allowed(self, request: Request) -> bool:
        key = presented_key(request.headers)
        if key is None:
            return False
        given = key.encode()
        ok = False
        for accepted in self._keys:  # each compared, in constant time
            ok |= hmac.compare_digest(given, accepted)
        return ok


def aiproxy_plugin(config: Config) -> Metrics:
    return Metrics(config)


__all__ = ["Metrics", "aiproxy_plugin", "multiprocess_dir"]


