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
A row is lost when the spool cannot be written either (disk full): each such row is
counted (``aiproxy_usage_rows_dropped_total``) and logged. Rows still in the queue (up to
``flush_interval`` seconds' worth, at most ``max_queue``) die with a process killed
outright (SIGKILL, the OOM killer); spooled ones do not.

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
import math
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
from aiproxy.builtin.usage.flusher import Flusher
from aiproxy.builtin.usage.spool import Spool, SpoolError
from aiproxy.builtin.usage.writer import Writer
from aiproxy.call import Call
from aiproxy.config import Config
from aiproxy.errors import ProxyError

log = logging.getLogger("aiproxy.usage")
KEYS = ("enabled", "flush_interval", "batch_size", "max_queue", "write_timeout", "retry_max",
        "shutdown_timeout", "spool_path", "fsync")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _number(settings: dict[str, Any], name: str, default: float, *, minimum: float = 0,
            integer: bool = False) -> float:
    value = settings.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"usage.{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):  # write_timeout: inf broke every write; int(nan) a crash
        raise ValueError(f"usage.{name}: expected a finite number, got {value!r}")
    if integer and number != int(number):
        raise ValueError(f"usage.{name}: expected a whole number, got {value!r}")
    if number < minimum:
        raise ValueError(f"usage.{name}: must be at least {minimum:g}, got {value!r}")
    return number


def _flag(settings: dict[str, Any], name: str, default: bool) -> bool:
    """A yes/no setting: YAML's booleans, or what an environment variable writes for them
    (``True``, ``off``, …). Anything else stops start-up: a typo must not turn a log off."""
    value = settings.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"usage.{name}: expected true or false, got {value!r}")


def spool_path(setting: Any, config: Config) -> Path:
    """Where the spool goes. ``usage.spool_path``, relative to the config file's folder;
    by default next to the SQLite file (``aiproxy.db`` → ``aiproxy.db.usage-spool``), else
    ``aiproxy-usage.spool`` in the working folder, where a relative SQLite file goes too
    (not beside the config: the image's /etc/aiproxy is root's, or a read-only mount,
    and an unwritable spool stops start-up); a config given as a dict, in tests: the
    temp folder, one file per database URL."""
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
        return Path.cwd() / "aiproxy-usage.spool"
    digest = hashlib.sha256((url or "").encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"aiproxy-usage-{digest}.spool"


class UsageLogs:
    def __init__(self, config: Config, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        settings = config.section("usage")
        unknown = sorted(set(settings) - set(KEYS), key=str)
        if unknown:
            raise ValueError(f"usage.{unknown[0]}: unknown setting (known: {', '.join(KEYS)})")
        self.enabled = _flag(settings, "enabled", True)
        self.flush_interval = _number(settings, "flush_interval", 1.0, minimum=0.001)
        self.batch_size = int(_number(settings, "batch_size", 500, minimum=1, integer=True))
        self.max_queue = int(_number(settings, "max_queue", 10_000, minimum=1, integer=True))
        self.write_timeout = _number(settings, "write_timeout", 10.0, minimum=0.01)
        self.retry_max = _number(settings, "retry_max", 30.0, minimum=0)
        self.shutdown_timeout = _number(settings, "shutdown_timeout", 15.0, minimum=0)
        path = settings.get("spool_path")
        if path is not None and not isinstance(path, str | Path):
            raise ValueError(f"usage.spool_path: expected a file path, got {path!r}")
        self.spool_path = spool_path(path, config)
        self.fsync = _flag(settings, "fsync", False)
        self.monotonic = monotonic
        self.closed = False  # shut down after having been active
        self.flusher: Flusher | None = None  # made at start-up, when the database is known
        # the response path: the flusher's enqueue while the stage takes rows, else None
        self._enqueue: Callable[[_rows.Captured], None] | None = None
        self._task: asyncio.Task[None] | None = None

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
        spool = Spool(self.spool_path, fsync=self.fsync)
        try:
            spool.check()
        except SpoolError as exc:
            raise ValueError(str(exc)) from None
        flusher = self.flusher = Flusher(
            spool, Writer(engine, timeout=self.write_timeout), batch_size=self.batch_size,
            max_queue=self.max_queue, flush_interval=self.flush_interval, retry_max=self.retry_max,
            monotonic=self.monotonic)
        self._enqueue = flusher.enqueue
        if spool.adopt():
            flusher.wake.set()  # a spool left from before: replay it at once, in the background
        self._task = asyncio.create_task(flusher.run(), name="aiproxy-usage-flusher")
        app.state.usage = flusher

    @hookimpl
    async def aiproxy_shutdown(self) -> None:
        flusher = self.flusher
        if self._enqueue is None or flusher is None:
            return
        flusher.stopping = True
        flusher.wake.set()
        deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task}, timeout=self.shutdown_timeout)
            if not task.done():
                task.cancel()  # its flush spools the batch it was writing
                await asyncio.wait({task})
        try:
            async with asyncio.timeout_at(deadline):
                flusher.retry_at = 0.0  # one last try, whatever the backoff says
                await flusher.flush()
        except TimeoutError:
            log.warning("usage: the database did not take the last rows within %gs; they stay "
                        "in the spool %s for the next start", self.shutdown_timeout, flusher.spool.path)
        finally:
            flusher.spool_rest()
            self._enqueue = None
            self.closed = True
            flusher.spool.close()

    @hookimpl
    def aiproxy_routes(self) -> list[BaseRoute]:
        from aiproxy.builtin.usage import api  # the management side: only when routes are built

        return api.routes()

    # ------------------------------------------------------------ the stage
    @hookimpl
    def aiproxy_after_call(self, call: Call) -> None:
        if self._enqueue is not None:
            self._enqueue(_rows.capture(call, None))
        elif self.closed:
            self._late(call, None)

    @hookimpl
    def aiproxy_on_error(self, call: Call, error: ProxyError) -> None:
        if call.operation == "count_tokens":
            return  # not a generation: nothing to bill or log
        if self._enqueue is not None:
            self._enqueue(_rows.capture(call, error))
        elif self.closed:
            self._late(call, error)

    def _late(self, call: Call, error: ProxyError | None) -> None:
        """A call that ended after shutdown (serve cancels streams still running 30 s into
        it, while the shutdown goes on): its row goes to the spool for the next start."""
        flusher = self.flusher
        assert flusher is not None
        try:
            flusher.spool.append([_rows.from_call(call, error)])
        except SpoolError as exc:
            flusher.dropped(1, exc)
        else:
            flusher.counts["spooled"] += 1
        finally:
            flusher.spool.close()  # unlocked: the next start adopts it

    @hookimpl
    def aiproxy_stats(self) -> dict[str, float] | None:
        flusher = self.flusher
        if flusher is None:
            return None
        counts = flusher.counts
        stats: dict[str, float] = {f"aiproxy_usage_rows_{name}_total": float(value)
                                   for name, value in counts.items() if name != "write_errors"}
        stats["aiproxy_usage_write_errors_total"] = float(counts["write_errors"])
        stats["aiproxy_usage_queue_rows"] = float(len(flusher.queue))
        stats["aiproxy_usage_database_down"] = 1.0 if flusher.down else 0.0
        return stats


def aiproxy_plugin(config: Config) -> UsageLogs:
    return UsageLogs(config)
