"""The OpenAI-compatible ``/v1`` routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aiproxy import validate, wire
from aiproxy.errors import ProxyError
from aiproxy.gateway import Gateway, error_response, internal_error, request_id
from aiproxy.routes.body import read_json

Validator = Callable[[dict[str, Any]], str]


def _operation(name: str, check: Validator) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway

        async def read() -> tuple[dict[str, Any], str]:
            body = await read_json(request, gateway.config.server.max_body_bytes)
            return body, check(body)

        return await gateway.handle(gateway.new_call(request, name), read, request.receive)

    endpoint.__name__ = f"{name}_endpoint"
    return endpoint


async def list_models(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    rid = request_id(request)
    try:
        await _authorised(request, gateway, rid)
        models = await gateway.router.list_models()
    except ProxyError as exc:
        return error_response(exc, rid)
    data = [wire.model_object(name, owner) for name, owner in models]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json",
                    headers={"x-request-id": rid})


async def retrieve_model(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    rid = request_id(request)
    model = request.path_params["model"]
    try:
        await _authorised(request, gateway, rid)
        owner = gateway.router.owner(model)
    except ProxyError as exc:
        return error_response(exc, rid)
    return Response(orjson.dumps(wire.model_object(model, owner)), media_type="application/json",
                    headers={"x-request-id": rid})


async def _authorised(request: Request, gateway: Gateway, rid: str) -> None:
    call = gateway.new_call(request, "models")
    call.request_id = rid
    try:
        await gateway.authenticate(call)
    except ProxyError:
        raise
    except Exception as exc:
        raise internal_error() from exc


routes = [
    Route("/v1/chat/completions", _operation("chat", validate.chat), methods=["POST"]),
    Route("/v1/completions", _operation("completion", validate.completion), methods=["POST"]),
    Route("/v1/embeddings", _operation("embedding", validate.embedding), methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
