"""The response cache stage: the same request from the same tenant gets the stored answer.

- **Key**: a SHA-256 hash of the caller's scope (its tenant, else its own key id, else
  "anonymous"), the operation, the upstream model, and the request body less the fields
  that do not change the answer (:data:`request.IGNORED`: ``user``, ``stream``,
  ``stream_options``, …), serialised by orjson with sorted keys.
- **What is cached**: embeddings, and chat/text completions with ``temperature: 0``;
  other calls only for models that ``cache.models`` marks ``sampled: true``. Errors,
  streams that were cut short or failed, answers a fallback model gave, and calls asking
  for logprobs or audio (:func:`request.replayable`) never are.
- **TTL**: per operation (``cache.ttl``; chat is ``ttl_seconds``), per model
  (``cache.models.<name>.ttl_seconds``), per request (``x-aiproxy-cache-ttl``).
- **Per request**: ``Cache-Control: no-cache`` skips the lookup but stores the answer;
  ``no-store`` does neither. Every answer says ``x-aiproxy-cache: hit|miss|skip``.
- **Backends**: in process (LRU, ``max_size`` entries, ``max_bytes``), or Redis when
  ``redis.url`` is set; a Redis failure is a miss, never a failed call.
- **Single flight** (:mod:`.flights`, ``cache.single_flight``, on by default): identical
  misses at the same time make one upstream call; the others wait for its stored answer
  (``cache.single_flight_wait`` seconds at most, 60, and no longer than their own
  timeouts) and are served it as hits. Per process, Redis or not. A *streaming* request
  never waits: replaying the leader's answer would bring its first token only with the
  leader's last, so it goes upstream at once as a plain miss (the leader stays). A
  streaming call may still lead: whole duplicates wait for it and get its stored answer.

A hit is the stored answer with its usage (the cost stage prices what it saved) under a
new ``id``; a streaming request gets it replayed as a stream, and a streamed miss is
assembled by the gateway and stored once it completed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from functools import partial
from typing import Any

import orjson
from starlette.applications import Starlette

from aiproxy import hookimpl, wire
from aiproxy.builtin.cache.backends import Clock, MemoryBackend, RedisBackend
from aiproxy.builtin.cache.flights import AGAIN, UPSTREAM, Flights, Outcome, Pending
from aiproxy.builtin.cache.request import (
    TTL_HEADER,
    cache_key,
    deterministic,
    directives,
    replayable,
    ttl_override,
)
from aiproxy.builtin.cache.settings import CacheSettings, parse_settings
from aiproxy.call import Call
from aiproxy.config import Config
from aiproxy.errors import ProxyError
from aiproxy.provider import Reply

log = logging.getLogger("aiproxy.cache")
HEADER = "x-aiproxy-cache"
_TTL_RAW = TTL_HEADER.encode()
_ANSWER_FIELD = {"chat": "choices", "completion": "choices", "embedding": "data", "image": "data"}


class ResponseCache:
    def __init__(self, config: Config, *, clock: Clock = time.monotonic) -> None:
        self.settings: CacheSettings = parse_settings(config)
        s = self.settings
        self.redis_url = config.redis_url if s.backend in ("auto", "redis") else None
        self.redis_prefix = str(config.section("redis").get("prefix") or "aiproxy:")
        self.memory = MemoryBackend(s.max_size, s.max_bytes, clock)
        self.redis: RedisBackend | None = None
        self._clock = clock
        self.flights = Flights()
        self.hits = self.misses = self.skips = self.stores = self.too_big = self.unreadable = 0

    @property
    def clock(self) -> Clock:
        return self._clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        """One clock for expiry and Redis retry (tests move it)."""
        self._clock = self.memory.clock = clock
        if self.redis is not None:
            self.redis.clock = clock

    # ------------------------------------------------------------ lifecycle
    @hookimpl
    def aiproxy_startup(self, app: Starlette) -> None:
        if self.settings.enabled and self.redis_url:
            try:
                self.redis = RedisBackend(self.redis_url, self.redis_prefix, self.settings.redis_retry,
                                          self._clock)
            except ValueError:  # not a URL redis can use (not logged: it may hold a password)
                log.warning("cache: redis.url is not a redis:// URL; answers are cached in process")

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        if self.redis is not None:
            redis, self.redis = self.redis, None
            await redis.aclose()

    async def settle(self) -> None:
        """Wait for background Redis writes (tests read back right after a call)."""
        if self.redis is not None:
            await self.redis.settle()

    # ------------------------------------------------------------ the stage
    @hookimpl
    def aiproxy_cache_lookup(self, call: Call) -> Reply | Awaitable[Reply | None] | None:
        """In process a plain function; an awaitable only to read Redis or to wait for an
        identical call's answer (single flight)."""
        if not self.settings.enabled:
            return None
        control, ttl_header = _asked(call)
        override = ttl_override(ttl_header, self.settings.max_ttl)  # checked first: a 400
        no_cache, no_store = directives(control)
        ttl = self._ttl(call, override)
        key = None if no_store or ttl is None else cache_key(call)
        if key is None or ttl is None:
            self._skip(call)
            return None
        pending = call.state["cache"] = Pending(key, ttl, call.upstream_model)
        call.collect = True  # a streamed answer is assembled for store
        if no_cache:
            self._skip(call)
            return None
        if self.redis is not None:
            return self._looked_up_in_redis(call, pending)
        return self._found(call, pending, self.memory.get(key))

    async def _looked_up_in_redis(self, call: Call, pending: Pending) -> Reply | None:
        assert self.redis is not None
        found = self._found(call, pending, await self.redis.get(pending.key))
        return await found if isinstance(found, Awaitable) else found

    def _found(self, call: Call, pending: Pending,
               raw: bytes | None) -> Reply | Awaitable[Reply | None] | None:
        """What the stored value ``raw`` answers; on a miss, lead the flight or follow it."""
        reply = None if raw is None else _reply(raw)
        if reply is None:
            if raw is not None:  # not an answer (another version's format?): replaced on store
                self.unreadable += 1
            if self.settings.single_flight:
                leader = self.flights.leader(pending)
                if leader is None:
                    if call.stream:  # a leading stream may end with neither store nor on-error
                        self.flights.watch(pending, partial(_left_off, call))
                elif not call.stream:  # an identical call is on its way upstream: wait for it
                    return self._follow(call, pending, leader)
                # a stream never follows: its first token would come with the leader's last
            return self._answered(call, None)
        return self._answered(call, reply)

    async def _follow(self, call: Call, pending: Pending, leader: Pending) -> Reply | None:
        shared = await self.flights.follow(pending, leader, self._patience(call))
        return self._answered(call, None if shared is None else _reply(shared))

    def _answered(self, call: Call, reply: Reply | None) -> Reply | None:
        if reply is None:
            self.misses += 1
            call.response_headers[HEADER] = "miss"
            return None
        self.hits += 1
        call.response_headers[HEADER] = "hit"
        return reply

    def _ttl(self, call: Call, override: float | None) -> float | None:
        """How long this call's answer is kept; None when it must not be cached."""
        op_ttl = self.settings.ttl.get(call.operation)
        if op_ttl is None:
            return None  # an operation the cache does not know (a plugin's own)
        rule = self.settings.rule(call.model)
        if not (rule.sampled or deterministic(call)) or not replayable(call.body):
            return None
        return override or rule.ttl or op_ttl

    def _patience(self, call: Call) -> float:
        """How long a follower (a whole call: streams do not follow) waits for its leader:
        ``single_flight_wait``, and no longer than its own deployment would wait for an answer."""
        wait = self.settings.single_flight_wait
        deployment = call.deployment
        if deployment is not None:
            limits = deployment.limits
            for own in (limits.total, limits.read):
                if own is not None and own < wait:
                    wait = own
        return wait

    def _skip(self, call: Call) -> None:
        self.skips += 1
        call.response_headers[HEADER] = "skip"

    @hookimpl
    def aiproxy_cache_store(self, call: Call, reply: Reply) -> None:
        """Store the answer; a leader's followers get it, or (not stored) go upstream."""
        pending = call.state.get("cache")
        if not isinstance(pending, Pending) or call.cached or call.error is not None:
            return
        raw = None
        try:
            raw = self._store(call, reply, pending)
        finally:  # whatever became of the answer, the followers hear of it
            if pending.lead:
                self.flights.land(pending, UPSTREAM if raw is None else raw)

    def _store(self, call: Call, reply: Reply, pending: Pending) -> bytes | None:
        """The answer's bytes as stored; None when it is not."""
        if call.upstream_model != pending.model:  # served by a fallback: not the key's model
            return None
        data = reply.data
        if not data.get(_ANSWER_FIELD.get(call.operation, "choices")):
            return None  # nothing worth replaying (an upstream's empty answer)
        if "usage" not in data and call.usage is not None:
            data = {**data, "usage": call.usage.to_openai()}  # a hit must carry usage
            raw = orjson.dumps(data)
        else:
            raw = reply.raw if reply.raw is not None else orjson.dumps(data)
        if len(raw) > self.settings.max_entry_bytes:
            self.too_big += 1
            return None
        self.stores += 1
        if self.redis is None:
            self.memory.set(pending.key, raw, pending.ttl)
        else:
            self.redis.set(pending.key, raw, pending.ttl)
        return raw

    @hookimpl
    def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        """A leader that failed: its followers go upstream; one whose client left (499)
        hands the flight on. (Not after-call: a leader's whole answer always reaches store,
        and a stream's end is watched, so calls that lead nothing pay no extra hook.)"""
        pending = call.state.get("cache")
        if pending is not None and pending.lead:
            # a leader that did not fail but was cut off (its client left, or a shutdown
            # cancelled it) hands the flight on; one that failed sends its followers upstream
            cut = error.status == 499 or error.code == "gateway_shutting_down"
            self.flights.land(pending, AGAIN if cut else UPSTREAM)

    # ------------------------------------------------------------ metrics
    @hookimpl
    def aiproxy_stats(self) -> dict[str, float]:
        stats = {
            "aiproxy_cache_hits_total": float(self.hits),
            "aiproxy_cache_misses_total": float(self.misses),
            "aiproxy_cache_skips_total": float(self.skips),
            "aiproxy_cache_stores_total": float(self.stores),
            "aiproxy_cache_too_big_total": float(self.too_big),
            "aiproxy_cache_unreadable_total": float(self.unreadable),
            "aiproxy_cache_flights": float(len(self.flights)),
            "aiproxy_cache_flight_waits_total": float(self.flights.waits),
            "aiproxy_cache_flight_shared_total": float(self.flights.shared),
            "aiproxy_cache_flight_timeouts_total": float(self.flights.timeouts),
        }
        if self.redis is None:
            stats["aiproxy_cache_entries"] = float(len(self.memory))
            stats["aiproxy_cache_bytes"] = float(self.memory.bytes)
            stats["aiproxy_cache_evictions_total"] = float(self.memory.evictions)
        else:
            stats["aiproxy_cache_backend_errors_total"] = float(self.redis.errors)
            stats["aiproxy_cache_writes_dropped_total"] = float(self.redis.dropped)
        return stats


def _left_off(call: Call) -> Outcome:
    """How a streaming leader whose task ended without store or on-error left its flight:
    its client went away, or it was cancelled before its end (AGAIN: a follower takes
    over), or its answer was not one to store (no finish, nothing assembled)."""
    if call.finished is None or call.metadata.get("client_disconnected"):
        return AGAIN
    return UPSTREAM


def _asked(call: Call) -> tuple[str | None, str | None]:
    """The client's Cache-Control and x-aiproxy-cache-ttl headers, in one pass over the raw
    list (ASGI names are lower case; two Headers.get calls would be two passes). Several
    Cache-Control lines are one list (RFC 9110): a no-store on any of them counts."""
    control = ttl = None
    for name, value in call.headers.raw:
        if name == b"cache-control":
            text = value.decode("latin-1")
            control = text if control is None else f"{control},{text}"
        elif name == _TTL_RAW:
            ttl = value.decode("latin-1")
    return control, ttl


def _reply(raw: bytes) -> Reply | None:
    """The stored answer under a new id (one response, one id, for logs and client-side
    stores); ``created`` stays when the answer was made. An answer without an id
    (embeddings) goes out as the stored bytes. None for a value that is not an answer."""
    try:
        data: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    old = data.get("id")
    if not isinstance(old, str):
        return Reply(data, raw)
    data["id"] = wire.new_id(old.split("-", 1)[0] if "-" in old else "chatcmpl")
    return Reply(data)


def aiproxy_plugin(config: Config) -> ResponseCache:
    return ResponseCache(config)
