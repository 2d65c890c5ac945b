"""The usage stage: one ``usage_logs`` row per call, written in batches off the response path.

After-call and on-error only capture the call's fields and append them to an in-memory
queue (about 1 µs). A background task writes the queue every ``usage.flush_interval`` seconds, or
as soon as ``usage.batch_size`` rows wait, one transaction of multi-row INSERTs per
batch (:mod:`.writer`). When the database does not take a batch, the batch and every
row after it go to the spool file (:mod:`.spool`), and are replayed in order once it
answers again; newer rows wait behind them, so the table keeps the order calls ended
in. Each row carries a unique ``uid`` and the insert skips one already present, so a
batch whose commit succeeded but whose answer was lost, or a spool replayed again
after a crash, still leaves exactly one row per call.

The queue holds at most ``usage.max_queue`` rows; a call that finds it full moves the
queue and its own row to the spool (one file write; never waits for the database).
The only way a row is lost is a spool that cannot be written either (disk full): each
such row is counted (``aiproxy_usage_rows_dropped_total``) and logged.

At shutdown the queue is flushed (or spooled, if the database is gone); at start-up a
spool left behind (a crash, an outage that outlived the process) is replayed. With no
database configured the stage is off, with one log line saying so.

``GET /api/ai/usage`` (:mod:`.api`) lists a tenant's rows with totals by model and day.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from aiproxy import hookimpl
from aiproxy.builtin.usage import rows as _rows
from aiproxy.builtin.usage.spool import Spool, SpoolError
from aiproxy.builtin.usage.writer import Writer, rejected
from aiproxy.call import Call
from aiproxy.config import Config
from aiproxy.errors import ProxyError

log = logging.getLogger("aiproxy.usage")
_TRUE = (True, "true", "yes", "on", "1")


def _number(settings: dict[str, Any], name: str, default: float, *, minimum: float = 0) -> float:
    value = settings.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"usage.{name}: expected a number, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"usage.{name}: must be at least {minimum:g}, got {value!r}")
    return number


def spool_path(setting: Any, config: Config) -> Path:
    """Where the spool goes. ``usage.spool_path``, relative to the config file's folder;
    by default next to the SQLite file (``aiproxy.db`` → ``aiproxy.db.usage-spool``), else
    ``aiproxy-usage.spool`` beside the config file (a config given as a dict, in tests:
    the temp folder, one file per database URL)."""
    source = Path(config.source)
    folder = source.parent if config.source != "<dict>" and source.is_file() else None
    if setting:
        path = Path(setting)
        return path if path.is_absolute() or folder is None else folder / path
    url = config.database_url
    with contextlib.suppress(Exception):
        parsed = make_url(url or "")
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            return Path(f"{parsed.database}.usage-spool")
    if folder is not None:
        return folder / "aiproxy-usage.spool"
    digest = hashlib.sha256((url or "").encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"aiproxy-usage-{digest}.spool"


class UsageLogs:
    def __init__(self, config: Config, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        settings = config.section("usage")
        self.enabled = settings.get("enabled", True) in _TRUE
        self.flush_interval = _number(settings, "flush_interval", 1.0, minimum=0.001)
        self.batch_size = int(_number(settings, "batch_size", 500, minimum=1))
        self.max_queue = int(_number(settings, "max_queue", 10_000, minimum=1))
        self.write_timeout = _number(settings, "write_timeout", 10.0, minimum=0.01)
        self.retry_max = _number(settings, "retry_max", 30.0, minimum=0)
        self.shutdown_timeout = _number(settings, "shutdown_timeout", 15.0, minimum=0)
        path = settings.get("spool_path")
        if path is not None and not isinstance(path, str | Path):
            raise ValueError(f"usage.spool_path: expected a file path, got {path!r}")
        self.spool_path = spool_path(path, config)
        self.fsync = settings.get("fsync", False) in _TRUE
        self.monotonic = monotonic
        self.active = False  # taking rows: enabled and a database is there
        self.closed = False  # shut down after having been active
        self.queue: list[_rows.Captured] = []  # calls not yet made rows, oldest first
        self.spool = Spool(self.spool_path, fsync=self.fsync)
        self.writer: Writer | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._inflight: list[dict[str, Any]] | None = None  # the batch being written now
        self._inflight_spooled = False
        self._retry_at = 0.0  # monotonic time of the next attempt after a failure
        self._backoff = 0.0
        self.down = False  # the last write failed
        self.counts = {"queued": 0, "written": 0, "spooled": 0, "replayed": 0, "dropped": 0,
                       "rejected": 0, "write_errors": 0}

    # ------------------------------------------------------------ lifecycle
    @hookimpl
    async def aiproxy_startup(self, app: Starlette) -> None:
        if not self.enabled:
            log.info("usage logs are off (usage.enabled: false)")
            return
        engine = getattr(app.state, "database", None)
        if engine is None:
            log.info("usage logs are off: no database is configured (database.url)")
            return
        try:
            self.spool.check()
        except SpoolError as exc:
            raise ValueError(str(exc)) from None
        self.writer = Writer(engine, timeout=self.write_timeout)
        self._wake = asyncio.Event()
        self._stopping = False
        self.active = True
        if self.spool.adopt():
            self._wake.set()  # a spool left from before: replay it at once, in the background
        self._task = asyncio.create_task(self._run(), name="aiproxy-usage-flusher")
        app.state.usage = self

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        if not self.active:
            return
        self._stopping = True
        assert self._wake is not None
        self._wake.set()
        deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task}, timeout=self.shutdown_timeout)
            if not task.done():
                task.cancel()  # its flush spools the batch it was writing
                await asyncio.wait({task})
        try:
            async with asyncio.timeout_at(deadline):
                self._retry_at = 0.0  # one last try, whatever the backoff says
                await self.flush()
        except TimeoutError:
            log.warning("usage: the database did not take the last rows within %gs; they stay "
                        "in the spool %s for the next start", self.shutdown_timeout, self.spool.path)
        finally:
            self._spool_rest()
            self.active = False
            self.closed = True
            self.spool.close()

    @hookimpl
    def aiproxy_routes(self) -> list[BaseRoute]:
        from aiproxy.builtin.usage import api  # the management side: only when routes are built

        return api.routes()

    # ------------------------------------------------------------ the stage
    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        if self.active:
            self._enqueue(_rows.capture(call, None))
        elif self.closed:
            self._dropped(1, SpoolError("the call ended after the usage stage shut down"))

    @hookimpl
    def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        if call.operation == "count_tokens":
            return  # not a generation: nothing to bill or log
        if self.active:
            self._enqueue(_rows.capture(call, error))
        elif self.closed:
            self._dropped(1, SpoolError("the call ended after the usage stage shut down"))

    @hookimpl
    def aiproxy_stats(self) -> dict[str, float] | None:
        if not self.active:
            return None
        stats: dict[str, float] = {f"aiproxy_usage_rows_{name}_total": float(value)
                                   for name, value in self.counts.items() if name != "write_errors"}
        stats["aiproxy_usage_write_errors_total"] = float(self.counts["write_errors"])
        stats["aiproxy_usage_queue_rows"] = float(len(self.queue))
        stats["aiproxy_usage_database_down"] = 1.0 if self.down else 0.0
        return stats

    def _enqueue(self, captured: _rows.Captured) -> None:
        """The response path: append, and wake the flusher when a batch is ready."""
        self.counts["queued"] += 1
        queue = self.queue
        if len(queue) >= self.max_queue:
            self._overflow(captured)
            return
        queue.append(captured)
        if len(queue) >= self.batch_size and self._wake is not None:
            self._wake.set()

    def _overflow(self, captured: _rows.Captured) -> None:
        """The queue is full: the batch being written (it may yet fail; a second copy is
        skipped on replay), the queue and this call go to the spool, in that order."""
        moved: list[dict[str, Any]] = []
        if self._inflight is not None and not self._inflight_spooled:
            moved.extend(self._inflight)
        moved.extend(map(_rows.materialize, self.queue))
        moved.append(_rows.materialize(captured))
        try:
            self.spool.append(moved)
        except SpoolError as exc:
            self._dropped(len(self.queue) + 1, exc)
            self.queue.clear()
            return
        if self._inflight is not None:
            self._inflight_spooled = True
        self.counts["spooled"] += len(self.queue) + 1
        self.queue.clear()
        log.warning("usage: the queue is full (%d rows); spooled them to %s", self.max_queue,
                    self.spool.path)

    def _dropped(self, count: int, exc: Exception) -> None:
        self.counts["dropped"] += count
        log.error("usage: %d row(s) LOST: the database did not take them and %s", count, exc)

    # ------------------------------------------------------------ the flusher
    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.flush()
            except Exception:  # never let the flusher die; the rows stay queued or spooled
                log.exception("usage: flush failed")

    async def flush(self) -> None:
        """Spooled rows first (they are older), then the queue, batch by batch. When the
        database fails (or is still backing off), the queue goes to the spool instead."""
        if self.writer is None:
            return
        if self.spool.pending() and not await self._replay():
            self._spool_rest()
            return
        while self.queue:
            if self.monotonic() < self._retry_at:
                self._spool_rest()
                return
            batch = [_rows.materialize(c) for c in self.queue[:self.batch_size]]  # uids fixed here
            del self.queue[:self.batch_size]
            self._inflight, self._inflight_spooled = batch, False
            try:
                ok = await self._write(batch)
            except BaseException:  # cancelled mid-write (shutdown): the batch may or may not be in
                if not self._inflight_spooled:
                    self._to_spool(batch)
                raise
            finally:
                self._inflight = None
            if not ok:
                if not self._inflight_spooled:
                    self._to_spool(batch)
                self._spool_rest()
                return
            if self.spool.pending():
                return  # the queue overflowed meanwhile: those rows are older than the queue's

    async def _replay(self) -> bool:
        """Write the spool, in order, batch by batch; empty it when all is in."""
        while self.spool.pending():
            if self.monotonic() < self._retry_at:
                return False
            lines, offset = self.spool.read(self.batch_size)
            batch = [_rows.from_spool(line) for line in lines]
            if batch and not await self._write(batch):
                return False
            self.spool.advance(offset)
            self.counts["replayed"] += len(batch)
        return True

    async def _write(self, batch: list[dict[str, Any]]) -> bool:
        """True once ``batch`` is in the database (or refused row by row, see _reject)."""
        assert self.writer is not None
        try:
            await self.writer.write(batch)
        except Exception as exc:
            if rejected(exc):
                await self._one_by_one(batch)
                return True
            self._failed(exc)
            return False
        self.counts["written"] += len(batch)
        if self.down:
            log.warning("usage: the database takes rows again")
        self.down, self._backoff, self._retry_at = False, 0.0, 0.0
        return True

    def _failed(self, exc: Exception) -> None:
        self.counts["write_errors"] += 1
        self._backoff = min(self.retry_max, max(self.flush_interval, self._backoff * 2))
        self._retry_at = self.monotonic() + self._backoff
        if not self.down:
            log.warning("usage: the database does not take rows (%s: %s); spooling to %s and "
                        "retrying", type(exc).__name__, _first_line(exc),
                        self.spool.path)
        self.down = True

    async def _one_by_one(self, batch: list[dict[str, Any]]) -> None:
        """The database refused the batch for what is in it: write each row alone, so one
        bad row (which is logged and counted, never retried forever) holds up no other."""
        assert self.writer is not None
        for row in batch:
            try:
                await self.writer.write([row])
            except Exception as exc:
                if not rejected(exc):
                    raise
                self.counts["rejected"] += 1
                log.error("usage: the database refused row %s (request %s): %s", row.get("uid"),
                          row.get("request_id"), type(exc).__name__)
            else:
                self.counts["written"] += 1

    def _to_spool(self, batch: list[dict[str, Any]]) -> None:
        try:
            self.spool.append(batch)
        except SpoolError as exc:
            self._dropped(len(batch), exc)
            return
        self.counts["spooled"] += len(batch)

    def _spool_rest(self) -> None:
        """Everything still queued goes to the spool, behind what is there already."""
        if self.queue:
            captured, self.queue = self.queue, []
            self._to_spool([_rows.materialize(c) for c in captured])


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no answer in time"


def aiproxy_plugin(config: Config) -> UsageLogs:
    return UsageLogs(config)
