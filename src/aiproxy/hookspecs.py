"""Every hook aiproxy calls. Implementations may take fewer arguments than the spec.

Any hook whose docstring says "may be async" can be an ``async def``; the core awaits
it through :mod:`aiproxy.hooks`. ``settings`` is always the implementing plugin's own
config section (``team_header: {header: x-team}`` → ``{"header": "x-team"}``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.applications import Starlette
    from starlette.routing import BaseRoute

    from aiproxy.call import Call, Principal
    from aiproxy.config import Config
    from aiproxy.errors import ProxyError
    from aiproxy.provider import Provider, Reply

hookspec = pluggy.HookspecMarker("aiproxy")


@hookspec
def aiproxy_register_providers(register: Callable[[str, type[Provider]], None]) -> None:
    """At start-up, once: call ``register(kind, ProviderClass)`` for each provider kind.

    A config entry ``providers: {x: {plugin: kind}}`` builds ``ProviderClass`` for it.
    Sync, no I/O: the class does its async work when it is called.
    """


@hookspec
def aiproxy_routes(config: Config) -> list[BaseRoute] | None:
    """At start-up, once: return extra Starlette routes to mount (management APIs, UIs).

    Sync. Routes are mounted after the built-in ones and cannot replace them.
    """


@hookspec
def aiproxy_startup(app: Starlette, config: Config, settings: dict[str, Any]) -> None:
    """When the app starts, before it takes traffic: open pools, start workers. May be async."""


@hookspec
def aiproxy_shutdown(app: Starlette, config: Config, settings: dict[str, Any]) -> None:
    """When the app stops, after traffic has drained: flush and close. May be async.

    Runs in reverse registration order; one plugin's failure does not skip the rest.
    """


@hookspec(firstresult=True)
def aiproxy_authenticate(call: Call, settings: dict[str, Any]) -> Principal | None:
    """Once per request, before every other stage: who is calling?

    Return a Principal for a caller you recognise, or None to let the next plugin try.
    Raise ProxyError(401, ...) to reject outright. The first non-None answer wins. When
    nobody answers and the gateway requires auth (``server.master_key`` is set), the
    call gets 401. May be async.
    """


@hookspec
def aiproxy_before_call(call: Call, settings: dict[str, Any]) -> None:
    """After authentication and routing, before the cache and the upstream.

    ``call.principal`` and ``call.deployment`` are set; the deployment is the first
    attempt's: a retry or fallback may serve the call from another one (read
    ``call.metadata["deployment"]`` in after-call for the one that did). Raise
    ProxyError to refuse (429 rate limit, 403 model access, …); write
    ``call.upstream_headers`` or ``call.response_headers``; rewrite ``call.body`` to
    change the request. Every implementation runs, in order. May be async.
    """


@hookspec(firstresult=True)
def aiproxy_cache_lookup(call: Call, settings: dict[str, Any]) -> Reply | None:
    """After before-call, instead of the upstream: return a cached Reply, or None.

    The first Reply wins and the upstream is not called; a streaming call gets it
    replayed as SSE. On a miss, set ``call.collect = True`` to have a stream's answer
    assembled and handed to cache-store when it completes. May be async.
    """


@hookspec
def aiproxy_cache_store(call: Call, reply: Reply, settings: dict[str, Any]) -> None:
    """After a successful upstream answer that did not come from the cache.

    For streams, ``reply`` holds the assembled final answer. May be async; do slow
    work off the response path.
    """


@hookspec
def aiproxy_after_call(call: Call, settings: dict[str, Any]) -> None:
    """When a call has its answer: ``call.response`` / ``call.usage`` are set.

    Non-streaming: runs before the response is sent, so it may add
    ``call.response_headers`` (a cost header); keep it to in-memory work and queue
    anything slow (usage logs are written in batches). Streaming: runs after the last
    chunk went out, or when the client went away. Every implementation runs. May be async.
    """


@hookspec
def aiproxy_on_error(call: Call, error: ProxyError, settings: dict[str, Any]) -> None:
    """When a call ends in an error the client will see (any stage or the upstream).

    For logging and metrics; it cannot change the answer. Every implementation runs.
    May be async.
    """


@hookspec
def aiproxy_stats(config: Config, settings: dict[str, Any]) -> dict[str, float] | None:
    """For ``/metrics``: this plugin's own counters and gauges in this process, name → value.

    Names are Prometheus names (``aiproxy_limits_backend_errors_total``); one ending in
    ``_total`` is a counter, any other a gauge. Sync, in memory, cheap: it may be asked
    every second.
    """


@hookspec
def aiproxy_readiness(config: Config, settings: dict[str, Any]) -> dict[str, Any] | None:
    """On ``GET /ready``: return ``{"name": ..., "ok": bool, "detail": ...}`` for a
    dependency you own (database, Redis), or None. May be async.
    """
