"""One exception type for every failure a client may see, and its OpenAI-shaped JSON."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ProxyError(Exception):
    """A failure with an HTTP status and an OpenAI error body.

    ``type`` defaults from the status (400 → invalid_request_error, 429 →
    rate_limit_error, …). ``headers`` go on the response (``retry-after``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else {}

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.message!r}, type={self.type!r}, code={self.code!r})"


def invalid(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    """A 400 invalid_request_error naming the offending field."""
    return ProxyError(400, message, param=param, code=code)


def internal_error() -> ProxyError:
    """A 500 for a failure of the gateway's own (logged where it happened, never echoed)."""
    return ProxyError(500, "The gateway failed while handling the request; it has been logged.",
                      type="internal_error", code="internal_error")
