"""Virtual keys: the authenticate stage for ``sk-…`` keys from the database and config.

A key is looked up by its SHA-256 in an in-process cache first; only a miss goes to
the database (and concurrent misses for one key share that one query), so an
authenticated call costs no database round trip. Entries live ``keys.cache_ttl``
seconds (default 30): a key revoked on another replica stops working within that
time, one revoked through this replica's store at once. Unknown keys are remembered
too (``keys.negative_ttl``, default 5 s), apart from known ones (``keys.max_unknown``
against ``keys.max_cached``) so a flood of made-up keys cannot push real ones out; at
most ``keys.max_lookups`` (8) lookups run at once; and a string that cannot be a
virtual key never reaches the database at all.

Expired and revoked keys get 401 saying which (``expired_api_key`` /
``revoked_api_key``). If the database fails, keys already cached keep working (past
their TTL too, until it is back); a key not in the cache gets 503. ``last_used_at``
is written in batches every ``keys.flush_interval`` seconds and at shutdown.

``keys.required`` (default false) makes a key mandatory even without a master key;
with it false, a call with no key or an unknown one runs as anonymous (loopback
only: ``aiproxy serve`` refuses other addresses without a master key).

Tenants' own provider keys (bring your own key) are decrypted into memory and put
in ``call.credentials`` for their calls; see :mod:`aiproxy.storage.credentials`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette

from aiproxy import hookimpl
from aiproxy.builtin.auth import presented_key
from aiproxy.builtin.declared_keys import parse_declared
from aiproxy.call import Call, Principal
from aiproxy.config import Config
from aiproxy.errors import ProxyError
from aiproxy.singleflight import SingleFlight
from aiproxy.storage.db import DatabaseError
from aiproxy.storage.keys import KeyStore
from aiproxy.storage.models import utcnow
from aiproxy.storage.records import KeyRecord

log = logging.getLogger("aiproxy.keys")
_SHAPE = re.compile(r"sk-[A-Za-z0-9_-]{43}")


def seconds_setting(settings: dict[str, Any], name: str, default: float) -> float:
    value = settings.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"keys.{name}: expected a number of seconds, got {value!r}") from None
    if number < 0:
        raise ValueError(f"keys.{name}: must not be negative")
    return number


def unavailable() -> ProxyError:
    return ProxyError(503, "The key store is unavailable, so this key cannot be checked; retry shortly.",
                      type="service_unavailable", code="service_unavailable", headers={"retry-after": "5"})


def principal_of(record: KeyRecord) -> Principal:
    """What every later stage sees of a key: who, which tenant, tier, models, limits."""
    return Principal(
        id=record.id, kind="key", user=record.user_id, tenant=record.tenant_id, tier=record.tier,
        roles=(record.role,), allowed_models=record.allowed_models,
        metadata={**record.metadata,  # the key's own metadata first: it cannot fake a limit
                  "key_name": record.name, "key_prefix": record.display if record.prefix else None,
                  "monthly_limit_tokens": record.monthly_limit_tokens,
                  "current_usage": record.current_usage, "usage_period": record.usage_period,
                  "expires_at": record.expires_at})


class VirtualKeys:
    def __init__(self, config: Config, *, monotonic: Callable[[], float] = time.monotonic,
                 now: Callable[[], dt.datetime] = utcnow) -> None:
        settings = config.section("keys")
        self.ttl = seconds_setting(settings, "cache_ttl", 30)
        self.negative_ttl = seconds_setting(settings, "negative_ttl", 5)
        self.flush_interval = seconds_setting(settings, "flush_interval", 30)
        self.max_cached = int(seconds_setting(settings, "max_cached", 100_000)) or 1
        self.max_unknown = int(seconds_setting(settings, "max_unknown", 10_000)) or 1
        # at most this many database lookups at once: a flood of made-up keys waits its
        # turn instead of taking the whole connection pool
        self._lookups = asyncio.Semaphore(int(seconds_setting(settings, "max_lookups", 8)) or 1)
        self.required = settings.get("required", False) in (True, "true", "yes", "on", "1")
        self.declared = parse_declared(settings.get("declared"), config.source)
        self.monotonic = monotonic
        self.now = now
        self.store: KeyStore | None = None
        self.cache: dict[str, tuple[float, KeyRecord]] = {}  # hash → (expiry, record)
        self.unknown: dict[str, float] = {}  # hash → expiry; apart, so garbage can't evict keys
        self._ids: dict[str, str] = {}  # key id → hash, to drop a changed key at once
        self._lookup: SingleFlight[str, KeyRecord | None] = SingleFlight(self._fetch)
        self._generation = 0  # bumped by forget(): a lookup in flight must not re-cache
        self.last_used: dict[str, dt.datetime] = {}
        self._flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle
    @hookimpl
    async def aiproxy_startup(self, app: Starlette) -> None:
        self.store = getattr(app.state, "key_store", None)
        gateway = getattr(app.state, "gateway", None)
        if self.required and gateway is not None:
            gateway.auth_required = True
        if self.store is not None:
            self.store.subscribe(self.forget)
            if self.flush_interval > 0:
                self._flusher = asyncio.create_task(self._flush_every(self.flush_interval))

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()

    # ------------------------------------------------------------ the stage
    @hookimpl
    async def aiproxy_authenticate(self, call: Call) -> Principal | None:
        key = presented_key(call.headers)
        if key is None:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()
        record = self.declared.get(digest)
        if record is None:
            if self.store is None or not _SHAPE.fullmatch(key):
                return None  # not a key this gateway could have issued: no lookup
            record = await self.lookup(digest)
            if record is None:
                return None  # unknown: the gateway answers 401 if a key is required
        now = self.now()
        status = record.status(now)
        if status == "revoked":
            assert record.revoked_at is not None
            raise ProxyError(401, f"This API key ({record.display}) was revoked at "
                             f"{record.revoked_at.isoformat(timespec='seconds')}.",
                             code="revoked_api_key")
        if status == "expired":
            assert record.expires_at is not None
            raise ProxyError(401, f"This API key ({record.display if record.prefix else record.name}) "
                             f"expired at {record.expires_at.isoformat(timespec='seconds')}.",
                             code="expired_api_key")
        if not record.metadata.get("declared"):
            self.last_used[record.id] = now
        return principal_of(record)

    async def lookup(self, digest: str) -> KeyRecord | None:
        """The record for a key hash: from the cache, else (once) from the database."""
        now = self.monotonic()
        entry = self.cache.get(digest)
        if entry is not None and entry[0] > now:
            return entry[1]
        if self.unknown.get(digest, 0.0) > now:
            return None
        try:
            return await self._lookup(digest)  # concurrent misses for one key share one query
        except DatabaseError:
            if entry is not None:
                log.warning("database unavailable; key %s served from the stale cache", entry[1].id)
                return entry[1]  # stale, but the database cannot say otherwise
            raise unavailable() from None

    async def _fetch(self, digest: str) -> KeyRecord | None:
        generation = self._generation
        assert self.store is not None
        async with self._lookups:
            record = await self.store.lookup_by_hash(digest)
        if generation == self._generation:  # no key changed meanwhile: the answer is current
            self._remember(digest, record)
        return record

    def _remember(self, digest: str, record: KeyRecord | None) -> None:
        now = self.monotonic()
        if record is None:
            gone = self.cache.pop(digest, None)  # deleted: never serve it stale later
            if gone is not None:
                self._ids.pop(gone[1].id, None)
            if len(self.unknown) >= self.max_unknown:
                _make_room(self.unknown, now, lambda until: until)
            self.unknown[digest] = now + self.negative_ttl
            return
        if len(self.cache) >= self.max_cached:
            for gone in _make_room(self.cache, now, lambda entry: entry[0]):
                self._ids.pop(gone[1].id, None)
        self.unknown.pop(digest, None)
        self.cache[digest] = (now + self.ttl, record)
        self._ids[record.id] = digest

    def forget(self, key_ids: Any) -> None:
        """The store changed these keys: the next call looks them up again."""
        self._generation += 1
        for key_id in key_ids:
            digest = self._ids.pop(key_id, None)
            if digest is not None:
                self.cache.pop(digest, None)

    # ------------------------------------------------------------ last_used_at
    async def flush(self) -> None:
        """Write the ``last_used_at`` of keys used since the last flush (one transaction)."""
        if not self.last_used or self.store is None:
            return
        batch, self.last_used = self.last_used, {}
        try:
            await self.store.touch(batch)
        except Exception as exc:
            log.warning("could not record last_used_at of %d key(s): %s", len(batch), exc)
            for key_id, when in batch.items():  # keep them for the next try
                self.last_used.setdefault(key_id, when)

    async def _flush_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.flush()


def _make_room(entries: dict[str, Any], now: float, expiry: Callable[[Any], float]) -> list[Any]:
    """Drop the expired entries, or (none expired) the oldest half; return what went."""
    victims = [d for d, value in entries.items() if expiry(value) <= now]
    if not victims:
        victims = list(entries)[: max(1, len(entries) // 2)]
    return [entries.pop(d) for d in victims]


def aiproxy_plugin(config: Config) -> VirtualKeys:
    return VirtualKeys(config)
