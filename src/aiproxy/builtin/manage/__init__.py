"""The management API under ``/api/ai``: keys, tenants, users, providers.

A built-in plugin adding routes through ``aiproxy_routes``. Every route
authenticates through the gateway's authenticate hook (the master key, or a virtual
key with the admin role for its own tenant; see :mod:`.access`), parses its JSON body
once, and answers JSON or an OpenAI-shaped error. It reads and writes the database
through ``app.state.key_store`` (the ``database`` plugin); without ``database.url``
the routes that need it answer 503 saying so.

| route | methods |
|---|---|
| ``/api/ai/keys`` | GET (list), POST (create: the plaintext key, once) |
| ``/api/ai/keys/self`` | GET: the caller's own key (any virtual key) |
| ``/api/ai/keys/{id}`` | GET, PATCH, DELETE (revoke) |
| ``/api/ai/keys/{id}/rotate`` | POST: a new secret; the old one stops (after ``grace``) |
| ``/api/ai/tenants``, ``/api/ai/tenants/{id}`` | GET, POST / GET, PATCH, DELETE |
| ``/api/ai/users``, ``/api/ai/users/{id}`` | GET, POST / GET, PATCH, DELETE |
| ``/api/ai/providers`` | GET: providers, their models and health; never a key |
| ``/api/ai/providers/{name}/credentials`` | GET, PUT/POST, DELETE: a tenant's own key (BYOK) |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from aiproxy import hookimpl
from aiproxy.builtin.manage import credentials, keys, people, providers
from aiproxy.builtin.manage.access import Handler, endpoint

PREFIX = "/api/ai"


def routes() -> list[BaseRoute]:
    def route(path: str, **handlers: Handler) -> Route:
        wrapped: dict[str, Callable[[Request], Awaitable[Response]]] = {
            method: endpoint(handler) for method, handler in handlers.items()}

        async def dispatch(request: Request) -> Response:
            return await wrapped[request.method](request)

        if "GET" in wrapped:
            wrapped["HEAD"] = wrapped["GET"]
        return Route(PREFIX + path, dispatch, methods=list(handlers))

    return [
        route("/keys", GET=keys.list_keys, POST=keys.create_key),
        route("/keys/self", GET=keys.get_self),
        route("/keys/{key_id}", GET=keys.get_key, PATCH=keys.update_key, DELETE=keys.revoke_key),
        route("/keys/{key_id}/rotate", POST=keys.rotate_key),
        route("/tenants", GET=people.list_tenants, POST=people.create_tenant),
        route("/tenants/{tenant_id}", GET=people.get_tenant, PATCH=people.change_tenant,
              DELETE=people.delete_tenant),
        route("/users", GET=people.list_users, POST=people.create_user),
        route("/users/{user_id}", GET=people.get_user, PATCH=people.change_user,
              DELETE=people.delete_user),
        route("/providers", GET=providers.list_providers),
        route("/providers/{provider}/credentials", GET=credentials.get_credential,
              PUT=credentials.put_credential, POST=credentials.put_credential,
              DELETE=credentials.delete_credential),
    ]


@hookimpl
def aiproxy_routes() -> list[BaseRoute]:
    return routes()
