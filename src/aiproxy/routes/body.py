"""Reading a request body: size-limited, parsed once."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request

from aiproxy.errors import ProxyError, invalid


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past ``limit`` bytes, 400 when it is not one."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise invalid("Content-Length header is not a number")
        if int(length) > limit:
            raise _too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not body.strip():
        raise invalid("The request body is empty; expected a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid(f"The request body must be a JSON object, not {_json_kind(data)}.")
    return data


def _too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"The request body is larger than this gateway accepts ({limit} bytes).",
                      code="request_too_large")


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean"}.get(type(value), "null")
