"""The attempt loop: one call's way through its pool, then its fallbacks.

An attempt that fails with a retryable error (see :mod:`.policy`) is followed by
another, on a deployment of the same pool this call has not tried yet if there is one
(at once), else on one it has (after exponential backoff with jitter, or the
upstream's ``retry-after`` when longer) — ``retries`` times at most. Then the model's
``fallbacks`` are tried in order, each with its own pool and retries. A request too
large for the model goes to ``context_window_fallbacks``; one refused by a content
policy to ``content_policy_fallbacks``. No new attempt starts, and no wait is begun,
past the model's ``deadline``: then the last error is the answer (a 429 keeps its
``retry-after``).

A client that leaves cancels the attempt in flight and, with it, this loop: nothing
is retried for nobody. Every attempt is recorded in ``call.metadata["attempts"]``;
the one that served names itself in ``x-aiproxy-deployment``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiproxy.errors import ProxyError
from aiproxy.routing import policy

if TYPE_CHECKING:
    from aiproxy.call import Call
    from aiproxy.provider import Reply
    from aiproxy.router import Deployment, Pool, Router

log = logging.getLogger("aiproxy.routing")
T = TypeVar("T")
Attempt = Callable[["Call", "Deployment", str], Awaitable[T]]
_LATENCY_WEIGHT = 0.3  # of the newest sample in the moving average


async def whole(call: Call, d: Deployment, method: str) -> Reply:
    """One attempt at a whole answer: ``provider.<method>``, within ``timeout.total``."""
    answer: Awaitable[Reply] = getattr(d.provider, method)(call, d)
    total = d.limits.total
    if total is None:
        return await answer
    try:
        async with asyncio.timeout(total):
            return await answer
    except TimeoutError:
        raise _timed_out(d, f"did not answer within {total:g}s (timeout.total)") from None


async def stream(call: Call, d: Deployment, method: str) -> tuple[bytes | None, AsyncIterator[bytes]]:
    """One attempt at a stream, up to its first event (within ``timeout.first_token``);
    the rest comes guarded by ``timeout.idle`` and ``timeout.total``."""
    events: AsyncIterator[bytes] = getattr(d.provider, method)(call, d)
    began = asyncio.get_running_loop().time()
    limits = d.limits
    wait = _least(limits.first_token, limits.total)
    try:
        if wait is None:
            first: bytes | None = await anext(events)
        else:
            async with asyncio.timeout(wait):
                first = await anext(events)
    except StopAsyncIteration:
        first = None
    except TimeoutError:
        await _close(events)
        raise _timed_out(d, f"sent no first token within {wait:g}s", "first_token_timeout") from None
    except BaseException:
        await _close(events)
        raise
    if limits.idle is not None or limits.total is not None:
        events = _Guarded(events, d, limits.idle, None if limits.total is None else began + limits.total)
    if d.count_streams:
        events = _Counted(events, d)
    return first, events


async def run(router: Router, call: Call, method: str, attempt: Attempt[T]) -> T:
    """Attempts until one succeeds; raise the last error when none may follow."""
    clock = router.clock
    pool = router.pool(call.model)
    settings = pool.settings
    model = call.model
    deadline = clock() + settings.deadline
    record: list[dict[str, Any]] = []
    call.metadata["attempts"] = record
    stats = router.stats
    chain: list[str] | None = None  # the models still to fall back to, once needed
    special = False  # moved to context-window / content-policy fallbacks already
    tried: dict[str, float] = {}  # deployment id → its retry-after (0: none), in this pool
    used = 0  # attempts in this pool
    error: ProxyError | None = None  # the last attempt's
    current: Deployment | None = call.deployment or router.pick(model, call.principal)
    if not pool.simple:
        await router.breaker.sync([d.id for d in pool.deployments])
        if current is not None and router.breaker.cooling(current.id):
            current = await _maybe_next(router, call, pool, skip_cooling=bool(settings.fallbacks))
    while True:
        if current is not None:
            began = clock()
            if current is not call.deployment or model is not call.model:
                call.deployment = current
                call.upstream_model = current.upstream_model(model)
            call.attempts += 1
            stats.attempts += 1
            current.in_flight += 1
            try:
                result = await attempt(call, current, method)
            except ProxyError as exc:
                error = exc
            except asyncio.CancelledError:
                record.append(_entry(current, 499, "client_closed_request", clock() - began))
                raise
            else:
                elapsed = clock() - began
                record.append(_entry(current, 200, None, elapsed))
                _served(router, call, pool, current, elapsed)
                if model != call.model:
                    call.metadata["fallback"] = model
                if router.breaker.troubled(current.id):
                    await router.breaker.succeeded(current.id)
                return result
            finally:
                current.in_flight -= 1
            record.append(_entry(current, error.status, error.code, clock() - began))
            stats.failures[current.id] += 1
            used += 1
            failed, current = current, None
            if not policy.retryable(error):
                if special or (chain := _special_fallbacks(router, call.model, error)) is None:
                    raise _final(router, call, error)
                special = True
            else:
                tried[failed.id] = policy.retry_after(error) or 0.0
                cooldown = settings.cooldown
                if cooldown is not None and await router.breaker.failed(failed.id, cooldown):
                    stats.cooldowns += 1
                retries = settings.retries
                if used <= (len(pool.deployments) - 1 if retries is None else retries):
                    nxt = await _next(router, call, pool, tried)
                    wait = 0.0
                    if nxt.id in tried:
                        wait = max(policy.backoff(used, settings.backoff_base, settings.backoff_max,
                                                  router.rng), tried[nxt.id])
                    if clock() + wait < deadline:
                        log.info("request %s: %s failed (%s %s); retrying on %s in %.2fs", call.request_id,
                                 failed.id, error.status, error.code, nxt.id, wait)
                        stats.retries += 1
                        if wait:
                            await router.sleep(wait)
                        current = nxt
                        continue
        # this pool is done: on to the next model, if any and if there is time
        if chain is None:
            chain = list(router.pool(call.model).settings.fallbacks)
        while current is None:
            if not chain or clock() >= deadline:
                if error is None:  # nothing could be tried: the model's own soonest-back it is
                    model, pool = call.model, router.pool(call.model)
                    settings = pool.settings
                    current = await _maybe_next(router, call, pool, skip_cooling=False)
                    if current is not None:
                        break
                raise _final(router, call, error or _no_attempt(pool))
            model = chain.pop(0)
            try:
                pool = router.pool(model)
            except ProxyError:
                continue  # its provider is unavailable: the next one
            settings = pool.settings
            current = await _maybe_next(router, call, pool, skip_cooling=bool(chain))
        if model is not call.model:
            log.info("request %s for %s: falling back to %s (%s)", call.request_id, call.model, model,
                     "no attempt made" if error is None else f"{error.status} {error.code}")
            stats.fallbacks += 1
        tried = {}
        used = 0


async def _maybe_next(router: Router, call: Call, pool: Pool, *, skip_cooling: bool) -> Deployment | None:
    try:
        return await _next(router, call, pool, {}, skip_cooling=skip_cooling)
    except ProxyError:
        return None


async def _next(router: Router, call: Call, pool: Pool, tried: dict[str, float], *,
                skip_cooling: bool = False) -> Deployment:
    """A deployment of ``pool`` for the next attempt: one not tried by this call and not
    cooling down, else one not cooling down, else the one back soonest. With
    ``skip_cooling``, raise instead of choosing one that is cooling."""
    candidates = pool.candidates(call.principal)
    breaker = router.breaker
    if len(candidates) > 1 or skip_cooling:
        await breaker.sync([d.id for d in pool.deployments])
    warm = [d for d in candidates if not breaker.cooling(d.id)]
    fresh = [d for d in warm if d.id not in tried]
    if fresh or warm:
        return pool.choose(fresh or warm, router.rng)
    if skip_cooling:
        raise _no_attempt(pool)
    return min(candidates, key=lambda d: breaker.cooling(d.id))


def _special_fallbacks(router: Router, model: str, error: ProxyError) -> list[str] | None:
    settings = router.pool(model).settings
    if settings.context_window_fallbacks and policy.too_large(error):
        return list(settings.context_window_fallbacks)
    if settings.content_policy_fallbacks and policy.refused_by_policy(error):
        return list(settings.content_policy_fallbacks)
    return None


def _served(router: Router, call: Call, pool: Pool, d: Deployment, elapsed: float) -> None:
    d.latency = elapsed if d.latency is None else d.latency + _LATENCY_WEIGHT * (elapsed - d.latency)
    router.stats.served[d.id] += 1
    call.metadata["deployment"] = d.id
    if pool.split:
        call.metadata["arm"] = d.id
    call.response_headers["x-aiproxy-deployment"] = d.id
    call.response_headers["x-aiproxy-attempts"] = "1" if call.attempts == 1 else str(call.attempts)


def _final(router: Router, call: Call, error: ProxyError) -> ProxyError:
    if call.attempts > 1:
        router.stats.exhausted += 1
        error.message = f"{error.message} (gave up after {call.attempts} attempts)"
    error.headers["x-aiproxy-attempts"] = str(call.attempts)
    if call.deployment is not None:
        error.headers["x-aiproxy-deployment"] = call.deployment.id
    return error


def _no_attempt(pool: Pool) -> ProxyError:
    return ProxyError(503, f"Every deployment of the model '{pool.name}' is cooling down after "
                      "repeated failures.", type="service_unavailable", code="no_healthy_deployment")


def _entry(d: Deployment, status: int, code: str | None, seconds: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"deployment": d.id, "status": status, "latency_ms": round(seconds * 1000, 1)}
    if code is not None:
        entry["code"] = code
    return entry


def _least(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _timed_out(d: Deployment, what: str, code: str = "upstream_timeout") -> ProxyError:
    return ProxyError(504, f"deployment {d.id!r} {what}", type="timeout_error", code=code)


async def _close(events: AsyncIterator[bytes]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


class _Counted:
    """``events``, counted in ``d.in_flight`` from now until the stream ends or is closed
    (least_busy: a stream is busy until its last event, not only until its first)."""

    def __init__(self, events: AsyncIterator[bytes], d: Deployment) -> None:
        d.in_flight += 1
        self._events = events
        self._d: Deployment | None = d

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._events)
        except BaseException:  # the end, a failure, or a cancellation
            self._release()
            raise

    def _release(self) -> None:
        if self._d is not None:
            self._d.in_flight -= 1
            self._d = None

    async def aclose(self) -> None:
        self._release()
        await _close(self._events)


class _Guarded:
    """``events``, ended by a 504 when one takes longer than ``idle`` or the stream
    runs past ``end`` (loop time); the relay turns that into an error event. Closing it
    closes ``events`` even before its first step (an async generator would not)."""

    def __init__(self, events: AsyncIterator[bytes], d: Deployment, idle: float | None,
                 end: float | None) -> None:
        self._events = events
        self._d = d
        self._idle = idle
        self._end = end

    def __aiter__(self) -> _Guarded:
        return self

    async def __anext__(self) -> bytes:
        idle, end = self._idle, self._end
        limit = idle if end is None else _least(idle, max(0.0, end - asyncio.get_running_loop().time()))
        try:
            async with asyncio.timeout(limit):
                return await anext(self._events)
        except TimeoutError:
            if end is not None and asyncio.get_running_loop().time() >= end:
                raise _timed_out(self._d, "did not finish its stream in time (timeout.total)") from None
            raise _timed_out(self._d, f"sent nothing for {idle:g}s mid-stream (timeout.idle)",
                             "upstream_idle_timeout") from None

    async def aclose(self) -> None:
        await _close(self._events)
