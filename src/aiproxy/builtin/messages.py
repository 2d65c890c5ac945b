"""The Anthropic Messages API in front of every model: ``POST /v1/messages`` and
``POST /v1/messages/count_tokens``.

A client of the ``anthropic`` SDK points ``base_url`` at the gateway and reaches any
configured model, Claude or not. Its request is checked and translated into the
gateway's OpenAI chat shape (:mod:`.messages_wire`), runs every stage exactly as a
``/v1/chat/completions`` call does (auth, limits, cache, routing, usage), and the answer
is rewritten into Anthropic's shape at the edge (:mod:`.messages_egress`), streams
included. Keys come as ``x-api-key`` (the auth stage reads it); ``anthropic-version``
and ``anthropic-beta`` are not required and are ignored. ``top_k`` reaches only
deployments whose provider kind takes it (``anthropic``).

The client's own request stays at ``call.state["messages"]`` for a provider that can use
it whole. ``count_tokens`` asks the routed deployment's provider
(:meth:`aiproxy.provider.Provider.count_tokens`); one that cannot count answers a 400
naming the provider.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from aiproxy import hookimpl, validate
from aiproxy.builtin.messages_egress import MessagesEgress
from aiproxy.builtin.messages_wire import to_chat
from aiproxy.errors import ProxyError
from aiproxy.gateway import Gateway, error_response, internal_error
from aiproxy.routes.body import read_json

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.config import Config

log = logging.getLogger("aiproxy.messages")
INGRESS = "anthropic"
EGRESS = MessagesEgress()  # stateless: one for every call
#: provider kinds that take Anthropic's ``top_k`` as it is; for the rest it is dropped
TOP_K_KINDS = frozenset(("anthropic",))


def _messages_call(request: Request, gateway: Gateway, operation: str) -> Call:
    call = gateway.new_call(request, operation)
    call.ingress = INGRESS
    call.egress = EGRESS
    return call


async def create_message(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    call = _messages_call(request, gateway, "chat")

    async def read() -> tuple[dict[str, Any], str]:
        body = await read_json(request, gateway.config.server.max_body_bytes)
        chat = to_chat(body)
        call.state["messages"] = body
        return chat, validate.chat(chat)  # the core's own checks still apply

    return await gateway.handle(call, read, request.receive)


async def count_tokens(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    call = _messages_call(request, gateway, "count_tokens")
    try:
        await gateway.authenticate(call)
        body = await read_json(request, gateway.config.server.max_body_bytes)
        call.body = to_chat(body, count_only=True)
        call.state["messages"] = body
        call.model = validate.chat(call.body)
        await gateway.admit(call)  # routing, model access and the before-call stages (BYOK keys)
        deployment = call.deployment
        assert deployment is not None
        tokens = await deployment.provider.count_tokens(call, deployment)
    except ProxyError as exc:
        return error_response(exc, call.request_id, EGRESS)
    except Exception:
        log.exception("count_tokens %s failed", call.request_id)
        return error_response(internal_error(), call.request_id, EGRESS)
    return Response(orjson.dumps({"input_tokens": tokens}), media_type="application/json",
                    headers={"x-request-id": call.request_id})


@hookimpl
def aiproxy_before_call(call: Call) -> None:
    """Give ``top_k`` back to a deployment whose provider speaks Anthropic's API."""
    if call.ingress != INGRESS or call.deployment is None:
        return
    top_k = call.state.get("messages", {}).get("top_k")
    if top_k is not None and call.deployment.provider.config.plugin in TOP_K_KINDS:
        call.body = {**call.body, "top_k": top_k}


@hookimpl
def aiproxy_routes(config: Config) -> list[BaseRoute]:
    return [
        Route("/v1/messages", create_message, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
