"""Who may do what on the management API, and the one wrapper every route goes through.

A caller authenticates exactly as on ``/v1`` (the gateway's authenticate hook):

- the master key (``Principal.kind == "master"``) sees and changes every tenant;
- a key with the ``admin`` role manages its own tenant only (a key of no tenant:
  the rows of no tenant), and cannot create tenants or delete its own;
- any other key gets 403, except ``GET /api/ai/keys/self`` (its own key's record);
- no key, or one nobody recognises: 401.

A row of another tenant answers 404, exactly as a row that does not exist, so ids
of other tenants reveal nothing. Database failures answer 503, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response

from aiproxy.call import Principal
from aiproxy.errors import ProxyError
from aiproxy.gateway import Gateway, error_response, internal_error, request_id
from aiproxy.routes.body import read_json
from aiproxy.storage.db import DatabaseError
from aiproxy.storage.keys import ALL_TENANTS, Conflict, KeyStore, NotFound, Scope, StoreError

log = logging.getLogger("aiproxy.manage")


@dataclass(slots=True)
class Caller:
    """An authorised management caller and the tenants it may touch."""

    principal: Principal
    request: Request
    master: bool
    admin: bool

    @property
    def scope(self) -> Scope:
        """What the store's ``tenant=`` gets: every tenant, or the caller's own."""
        return ALL_TENANTS if self.master else self.principal.tenant

    @property
    def store(self) -> KeyStore:
        store = getattr(self.request.app.state, "key_store", None)
        if store is None:
            raise ProxyError(503, "The management API needs a database: set database.url in the config.",
                             code="database_not_configured")
        return store

    def require_admin(self) -> None:
        if not self.admin:
            raise ProxyError(403, "This key may not use the management API: it needs the admin role "
                             "(or use the master key).", code="insufficient_permissions")

    def require_master(self, what: str) -> None:
        self.require_admin()
        if not self.master:
            raise ProxyError(403, f"Only the master key may {what}.", code="insufficient_permissions")

    def own_tenant(self, tenant_id: str | None) -> bool:
        return self.master or tenant_id == self.principal.tenant


async def authorise(request: Request) -> Caller:
    gateway: Gateway = request.app.state.gateway
    call = gateway.new_call(request, "manage")
    principal = await gateway.authenticate(call)
    if principal.kind == "anonymous":
        raise ProxyError(401, "The management API needs the master key or an admin key: "
                         "send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    master = principal.kind == "master"
    return Caller(principal, request, master, master or "admin" in principal.roles)


async def body_of(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The JSON object body, parsed once; ``{}`` for an empty optional body."""
    if optional and request.headers.get("content-length") in (None, "0") and \
            "chunked" not in request.headers.get("transfer-encoding", ""):
        return {}
    gateway: Gateway = request.app.state.gateway
    return await read_json(request, gateway.config.server.max_body_bytes)


Result = tuple[int, Any]
Handler = Callable[[Caller], Awaitable[Result]]


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint: authorise, run ``handler``, answer JSON or an OpenAI error."""

    async def run(request: Request) -> Response:
        rid = request_id(request)
        try:
            caller = await authorise(request)
            status, data = await handler(caller)
        except ProxyError as exc:
            return error_response(exc, rid)
        except NotFound as exc:
            return error_response(ProxyError(404, str(exc), code="not_found"), rid)
        except Conflict:
            return error_response(ProxyError(409, "That conflicts with an existing row (a name "
                                             "already taken?).", type="invalid_request_error",
                                             code="conflict"), rid)
        except StoreError as exc:
            return error_response(ProxyError(400, str(exc), code="invalid_value"), rid)
        except (DatabaseError, SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("management %s %s: the database failed: %s", request.method, request.url.path,
                        type(exc).__name__)
            return error_response(ProxyError(503, "The database is unavailable; try again shortly.",
                                             code="database_unavailable"), rid)
        except Exception:
            log.exception("management %s %s failed", request.method, request.url.path)
            return error_response(internal_error(), rid)
        return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                        headers={"x-request-id": rid, "cache-control": "no-store"})

    run.__name__ = handler.__name__
    return run
