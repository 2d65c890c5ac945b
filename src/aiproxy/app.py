"""create_app(config) → Starlette. No work at import time; each app has its own plugins."""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pluggy
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from aiproxy.config import Config
from aiproxy.errors import ProxyError
from aiproxy.gateway import Gateway, error_response, internal_error, request_id
from aiproxy.hooks import Hooks
from aiproxy.plugins import build_plugin_manager, check_provider_kinds, provider_kinds
from aiproxy.provider import Provider
from aiproxy.router import Router
from aiproxy.routes import health, v1
from aiproxy.upstream import build_client

log = logging.getLogger("aiproxy")


def create_app(config: Config, *, transport: httpx.AsyncBaseTransport | None = None,
               plugin_manager: pluggy.PluginManager | None = None) -> Starlette:
    """Build the gateway for ``config``.

    ``transport`` replaces the network under the shared upstream client (tests pass
    ``httpx.MockTransport``). Raises ConfigError / PluginError before anything listens.
    """
    pm = plugin_manager or build_plugin_manager(config)
    hooks = Hooks(pm, config.section)
    kinds = provider_kinds(hooks)
    check_provider_kinds(config, kinds)
    _warn_unclaimed_sections(config, pm)
    routes: list[BaseRoute] = [*v1.routes, *health.routes]
    for extra in hooks.sync_all("aiproxy_routes", config=config):
        routes.extend(extra)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        http = build_client(transport)
        providers, disabled = build_providers(config, kinds, http)
        router = Router(config.models, providers, disabled, redis_url=config.redis_url,
                        redis_prefix=str(config.section("redis").get("prefix") or "aiproxy:"))
        app.state.gateway = Gateway(config, hooks, router)
        starters = hooks.implementers("aiproxy_startup")
        started: set[str] = set()
        try:
            for plugin in starters:
                await hooks.one("aiproxy_startup", plugin, app=app, config=config)
                started.add(plugin)
            yield
        finally:
            for plugin in reversed(hooks.implementers("aiproxy_shutdown")):
                if plugin in starters and plugin not in started:
                    continue  # its start-up never ran
                try:
                    await hooks.one("aiproxy_shutdown", plugin, app=app, config=config)
                except Exception:
                    log.exception("shutdown of plugin %r failed", plugin)
            for provider in providers.values():
                try:
                    await provider.aclose()
                except Exception:
                    log.exception("closing provider %r failed", provider.name)
            await http.aclose()
            await router.aclose()

    app = App(routes=routes, lifespan=lifespan, exception_handlers={
        HTTPException: _http_exception,
        Exception: _unhandled,
    })
    app.state.config = config
    app.state.hooks = hooks
    app.state.plugin_manager = pm
    return app


def _warn_unclaimed_sections(config: Config, pm: pluggy.PluginManager) -> None:
    """A section named like a loaded plugin but not quite is probably a typo."""
    loaded = [name for name, _ in pm.list_name_plugin()]
    for section in config.sections:
        if section in loaded:
            continue
        near = difflib.get_close_matches(section, loaded, n=1, cutoff=0.8)
        if near:
            log.warning("config section %r matches no loaded plugin; did you mean %r?", section, near[0])


def build_providers(config: Config, kinds: dict[str, type[Provider]], http: httpx.AsyncClient, *,
                    quiet: bool = False) -> tuple[dict[str, Provider], dict[str, str]]:
    """One instance per ``providers:`` entry; those missing a required setting are left
    out (``disabled`` maps their names to the reason), each with one log line."""
    providers: dict[str, Provider] = {}
    disabled: dict[str, str] = {}
    for pc in config.providers.values():
        provider = kinds[pc.plugin](pc, http)
        missing = provider.missing()
        if missing:
            reason = f"{' and '.join(missing)} is not set"
            if not quiet:
                log.warning("provider %r is left out of routing: %s", pc.name, reason)
            disabled[pc.name] = reason
            continue
        providers[pc.name] = provider
    return providers, disabled


class App(Starlette):
    """Starlette, with a short way in for the calls that carry the traffic.

    A POST to a fixed path served by a plain route (``/v1/chat/completions``,
    ``/v1/messages``, …) goes straight to its endpoint: the same Request, the same
    Response, without the middleware stack, the route table walk and the exception
    wrappers around it (~10 % of the gateway's own CPU per call, measured in process).
    Anything else, or any app given middleware, takes Starlette's way.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct: dict[str, Callable[[Request], Awaitable[Response]]] = {}
        for route in self.routes:  # the first route for a path wins, as in Starlette's router
            if isinstance(route, Route) and route.methods == {"POST"} and not route.param_convertors \
                    and route.path not in self._direct and inspect.iscoroutinefunction(route.endpoint):
                self._direct[route.path] = route.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path") \
                and not self.user_middleware:
            endpoint = self._direct.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                request = Request(scope, receive, send)
                try:
                    response = await endpoint(request)
                except Exception as exc:  # what Starlette's error middleware would answer
                    response = await _unhandled(request, exc)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = ProxyError(404, f"No route for {request.method} {request.url.path}.", code="not_found")
    elif exc.status_code == 405:
        error = ProxyError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                           type="invalid_request_error", code="method_not_allowed",
                           headers=exc.headers or None)
    else:
        error = ProxyError(exc.status_code, str(exc.detail))
    return error_response(error, request_id(request))


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error(), request_id(request))
