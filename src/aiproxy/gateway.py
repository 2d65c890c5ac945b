"""The path of one call: authenticate, route, before-call, cache, provider, after-call.

Routes parse and validate; this runs the stages and turns the outcome into a
response. Stages talk only through hooks; the provider is reached through the router.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from starlette.responses import Response

from aiproxy import sse
from aiproxy.call import Call, Egress, Principal, Usage
from aiproxy.errors import ProxyError, internal_error
from aiproxy.provider import Reply
from aiproxy.relay import StreamRelay, estimated, replay

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import Receive

    from aiproxy.config import Config
    from aiproxy.hooks import Hooks
    from aiproxy.router import Router

log = logging.getLogger("aiproxy.gateway")
Reader = Callable[[], Awaitable[tuple[dict[str, Any], str]]]

ANONYMOUS = Principal(id="anonymous", kind="anonymous")
_GATEWAY, _ANSWERED = "gateway", "answered"  # call.state: the upstream answered a whole call
_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_WHOLE = {"chat": "chat", "completion": "completion", "embedding": "embedding"}
_STREAMED = {"chat": "chat_stream", "completion": "completion_stream"}
#: seconds a call runs before a task starts watching for its client leaving (see
#: Gateway._unless_client_leaves): upstream work for a gone client runs at most this long
WATCH_AFTER = 0.02


def request_id(request: Request) -> str:
    """The client's ``x-request-id`` when it is a sane token, else a new one: 24 hex digits,
    this process's random 64-bit prefix then a counter (unique without a system call per
    request; ids are for finding a call in logs, not secrets)."""
    given = request.headers.get("x-request-id")
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    n = next(_ids)
    if n > 0xFFFFFFFF:
        _new_prefix()
        n = next(_ids)
    return f"{_id_prefix}{n:08x}"


def _new_prefix() -> None:
    global _id_prefix, _ids
    _id_prefix, _ids = os.urandom(8).hex(), itertools.count()


_id_prefix, _ids = "", itertools.count()
_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)  # a forked worker never repeats its parent's ids


def error_response(exc: ProxyError, rid: str | None = None, egress: Egress | None = None) -> Response:
    headers = dict(exc.headers)
    if rid:
        headers["x-request-id"] = rid
    body = exc.json() if egress is None else egress.error(exc)
    return Response(body, status_code=exc.status, headers=headers, media_type="application/json")


class Gateway(StreamRelay):
    def __init__(self, config: Config, hooks: Hooks, router: Router) -> None:
        self.config = config
        self.hooks = hooks
        self.router = router
        self.auth_required = config.server.master_key is not None

    def new_call(self, request: Request, operation: str) -> Call:
        return Call(request_id=request_id(request), operation=operation, body={}, model="",
                    stream=False, headers=request.headers)

    async def handle(self, call: Call, read: Reader, receive: Receive | None = None) -> Response:
        """Run every stage for ``call``; always returns a response, never raises.

        ``read`` parses and validates the body into (body, model); it runs after
        authentication, so a caller without a valid key learns nothing about the API.
        With ``receive`` (the ASGI channel), a client that goes away before its answer
        starts cancels the upstream call instead of leaving it to run and be paid for.
        """
        try:
            await self.authenticate(call)
            call.body, call.model = await read()
            call.stream = call.body.get("stream") is True
            await self.admit(call)
            if receive is None:
                return await self._answer(call)
            return await self._unless_client_leaves(call, receive)
        except ProxyError as exc:
            return await self.fail(call, exc)
        except Exception:
            log.exception("request %s failed", call.request_id)
            return await self.fail(call, internal_error())
        except asyncio.CancelledError:  # by someone else (a shutdown): no answer, but the
            # before-call stages had their turn, so on-error gives back what they took
            # (quota and rate-limit reservations); an answered call is after-call's to settle
            if call.deployment is not None and call.state.get(_GATEWAY) != _ANSWERED:
                call.error = ProxyError(503, "The gateway shut down before the answer.",
                                        type="service_unavailable", code="gateway_shutting_down")
                call.finished = time.perf_counter()
                with anyio.CancelScope(shield=True):
                    await self._quietly("aiproxy_on_error", call=call, error=call.error)
            raise

    async def _answer(self, call: Call) -> Response:
        return await (self._stream(call) if call.stream else self._whole(call))

    async def _unless_client_leaves(self, call: Call, receive: Receive) -> Response:
        """Answer, unless the client disconnects first: then cancel the work and say 499.

        The watcher (one plain task; a task group costs ~4x as much and wraps errors in
        groups) starts only once the call has run for WATCH_AFTER seconds: a call answered
        sooner (a cache hit, a fast upstream) never pays for a task, and a client leaving
        is noticed at most that much later. It cancels this task; only its own
        cancellation is caught.
        """
        task = asyncio.current_task()
        assert task is not None
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            except Exception:  # a broken channel is the server's to report, not ours
                return
            call.metadata["client_disconnected"] = True
            if call.state.get(_GATEWAY) != _ANSWERED:
                task.cancel()

        def start() -> None:
            nonlocal watcher
            watcher = asyncio.create_task(watch())

        timer = asyncio.get_running_loop().call_later(WATCH_AFTER, start)
        try:
            return await self._answer(call)
        except asyncio.CancelledError:
            if watcher is None or not (watcher.done() and not watcher.cancelled()) or task.uncancel():
                raise  # cancelled by someone else (shutdown): let it through
            raise ProxyError(499, "The client closed the request before its answer began.",
                             type="client_closed_request", code="client_closed_request") from None
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    async def authenticate(self, call: Call) -> Principal:
        principal = await self.hooks.first("aiproxy_authenticate", call=call)
        if principal is None:
            if self.auth_required:
                has_key = "authorization" in call.headers or "x-api-key" in call.headers
                raise ProxyError(401, "Incorrect API key provided." if has_key else
                                 "No API key provided: send 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key")
            principal = ANONYMOUS
        call.principal = principal
        return principal

    async def admit(self, call: Call) -> None:
        """Route, check model access, run the before-call stages (after authenticate)."""
        principal = call.principal or ANONYMOUS
        deployment = self.router.pick(call.model, principal)  # the first attempt's
        allowed = principal.allowed_models
        if allowed is not None and call.model not in allowed:
            raise ProxyError(403, f"This key may not use the model '{call.model}'.", param="model",
                             code="model_not_allowed")
        call.deployment = deployment
        call.upstream_model = deployment.upstream_model(call.model)
        await self.hooks.all("aiproxy_before_call", call=call)

    # ------------------------------------------------------------ whole answers
    async def _whole(self, call: Call) -> Response:
        reply = await self._cached(call)
        if reply is None:
            reply = await self.router.whole(call, _WHOLE[call.operation])
            # answered: from here a client that leaves no longer cancels this task, so the
            # stages below (which may await Redis) finish, and on-error never follows them
            call.state[_GATEWAY] = _ANSWERED
            call.response = reply.data
            if call.usage is None:
                usage = Usage.from_openai(reply.data.get("usage"))
                # none, or all zeros (Gemini's embeddings count nothing): the upstream did not say
                call.usage = usage if usage is not None and usage.total_tokens else estimated(call)
            await self._quietly("aiproxy_cache_store", call=call, reply=reply)
        call.state[_GATEWAY] = _ANSWERED
        call.finished = time.perf_counter()
        await self._quietly("aiproxy_after_call", call=call)
        headers = {**reply.headers, **call.response_headers, "x-request-id": call.request_id}
        if call.egress is not None:
            return Response(call.egress.whole(call, reply), headers=headers,
                            media_type=call.egress.media_type)
        return Response(reply.body(), headers=headers, media_type="application/json")

    async def _cached(self, call: Call) -> Reply | None:
        reply: Reply | None = await self.hooks.first("aiproxy_cache_lookup", call=call)
        if reply is not None:
            call.cached = True
            call.response = reply.data
            call.usage = Usage.from_openai(reply.data.get("usage"))
        return reply

    # ------------------------------------------------------------ streams
    async def _stream(self, call: Call) -> Response:
        reply = await self._cached(call)
        events: AsyncIterator[bytes]
        if reply is not None:
            events = replay(reply, call.include_usage)
            first: bytes | None = await anext(events, None)
        else:
            method = _STREAMED.get(call.operation)
            if method is None:
                raise ProxyError(400, f"'stream' is not supported for {call.operation} requests",
                                 param="stream")
            # The router waits for the first event before we answer: a failure up to there
            # is retried, fallen back, or a proper HTTP error — not a 200 with an error inside.
            first, events = await self.router.stream(call, method)
        headers = {**call.response_headers, **_STREAM_HEADERS, "x-request-id": call.request_id}
        if call.egress is not None:
            return sse.EventStream(self._rewritten(call, first, events, call.egress.writer(call)), headers)
        return sse.EventStream(self._relay(call, first, events), headers)

    # ------------------------------------------------------------ errors
    async def fail(self, call: Call, exc: ProxyError) -> Response:
        call.error = exc
        call.finished = time.perf_counter()
        await self._quietly("aiproxy_on_error", call=call, error=exc)
        return error_response(exc, call.request_id, call.egress)

    async def _quietly(self, hook: str, **kwargs: Any) -> None:
        """Run a hook whose failure must not cost the client its answer, nor the later
        stages their turn: each plugin's failure is logged and the others still run."""
        if self.hooks.has(hook):
            await self.hooks.each(hook, **kwargs)
