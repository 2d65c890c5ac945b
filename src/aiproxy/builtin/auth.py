"""The master key: ``server.master_key`` admits its holder as the gateway's admin.

Keys come as ``Authorization: Bearer <key>`` (OpenAI SDKs), ``x-api-key`` (Anthropic
SDKs) or ``api-key`` (Azure SDKs). A key this plugin does not recognise is left to the
next authenticate plugin (virtual keys); compared in constant time, never logged.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from aiproxy import hookimpl
from aiproxy.call import Call, Principal

if TYPE_CHECKING:
    from starlette.datastructures import Headers

    from aiproxy.config import Config

MASTER = Principal(id="master", kind="master", roles=("admin",))


def presented_key(headers: Headers) -> str | None:
    """The API key a client sent, from whichever header its SDK uses."""
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("x-api-key") or headers.get("api-key") or None


class MasterKey:
    def __init__(self, key: str | None) -> None:
        self._key = key.encode() if key else None

    @hookimpl
    def aiproxy_authenticate(self, call: Call) -> Principal | None:
        if self._key is None:
            return None
        key = presented_key(call.headers)
        if key is not None and hmac.compare_digest(key.encode(), self._key):
            return MASTER
        return None


def aiproxy_plugin(config: Config) -> MasterKey:
    return MasterKey(config.server.master_key)
