"""Liveness and readiness."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aiproxy.gateway import Gateway

_OK = orjson.dumps({"status": "ok"})


async def health(request: Request) -> Response:
    """Liveness: the process answers. No dependency is checked."""
    return Response(_OK, media_type="application/json")


async def ready(request: Request) -> Response:
    """Readiness: every dependency a plugin owns answers (database, Redis, …)."""
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    if gateway is None:
        return Response(orjson.dumps({"status": "starting", "checks": []}), status_code=503,
                        media_type="application/json")
    checks = []
    try:
        checks = await gateway.hooks.all("aiproxy_readiness", config=gateway.config)
    except Exception as exc:
        checks.append({"name": "readiness", "ok": False, "detail": type(exc).__name__})
    ok = all(bool(c.get("ok")) for c in checks)
    body = {"status": "ready" if ok else "not ready", "checks": checks,
            "models": len(gateway.router.exact_names())}
    return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")


routes = [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"])]
