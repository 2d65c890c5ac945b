"""The flusher: the in-memory queue, its batches into the database, the spool in between.

Everything here but :meth:`Flusher.enqueue` runs in one background task (and at
shutdown): the response path only appends. See the package docstring for the rules
(order, exactly once, bounded queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiproxy.builtin.usage import rows as _rows
from aiproxy.builtin.usage.spool import Spool, SpoolError
from aiproxy.builtin.usage.writer import Writer, rejected

log = logging.getLogger("aiproxy.usage")


class Flusher:
    def __init__(self, spool: Spool, writer: Writer | None, *, batch_size: int, max_queue: int,
                 flush_interval: float, retry_max: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.writer = writer
        self.batch_size = batch_size
        self.max_queue = max_queue
        self.flush_interval = flush_interval
        self.retry_max = retry_max
        self.monotonic = monotonic
        self.queue: list[_rows.Captured] = []  # calls not yet made rows, oldest first
        self.wake = asyncio.Event()
        self.stopping = False
        self._inflight: list[dict[str, Any]] | None = None  # the batch being written now
        self._inflight_spooled = False
        self.retry_at = 0.0  # monotonic time of the next attempt after a failure
        self._backoff = 0.0
        self.down = False  # the last write failed
        self.counts = {"queued": 0, "written": 0, "spooled": 0, "replayed": 0, "dropped": 0,
                       "rejected": 0, "write_errors": 0}

    def enqueue(self, captured: _rows.Captured) -> None:
        """The response path: append, and wake the flusher when a batch is ready."""
        self.counts["queued"] += 1
        queue = self.queue
        if len(queue) >= self.max_queue:
            self._overflow(captured)
            return
        queue.append(captured)
        if len(queue) >= self.batch_size:
            self.wake.set()

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
            self.dropped(len(self.queue) + 1, exc)
            self.queue.clear()
            return
        if self._inflight is not None:
            self._inflight_spooled = True
        self.counts["spooled"] += len(self.queue) + 1
        self.queue.clear()
        log.warning("usage: the queue is full (%d rows); spooled them to %s", self.max_queue,
                    self.spool.path)

    def dropped(self, count: int, exc: Exception) -> None:
        self.counts["dropped"] += count
        log.error("usage: %d row(s) LOST: the database did not take them and %s", count, exc)

    # ------------------------------------------------------------ the flusher
    async def run(self) -> None:
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval):
                    await self.wake.wait()
            self.wake.clear()
            if self.stopping:
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
            self.spool_rest()
            return
        while self.queue:
            if self.monotonic() < self.retry_at:
                self.spool_rest()
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
                self.spool_rest()
                return
            if self.spool.pending():
                return  # the queue overflowed meanwhile: those rows are older than the queue's

    async def _replay(self) -> bool:
        """Write the spool, in order, batch by batch; empty it when all is in."""
        while self.spool.pending():
            if self.monotonic() < self.retry_at:
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
        self.down, self._backoff, self.retry_at = False, 0.0, 0.0
        return True

    def _failed(self, exc: Exception) -> None:
        self.counts["write_errors"] += 1
        self._backoff = min(self.retry_max, max(self.flush_interval, self._backoff * 2))
        self.retry_at = self.monotonic() + self._backoff
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
            self.dropped(len(batch), exc)
            return
        self.counts["spooled"] += len(batch)

    def spool_rest(self) -> None:
        """Everything still queued goes to the spool, behind what is there already."""
        if self.queue:
            captured, self.queue = self.queue, []
            self._to_spool([_rows.materialize(c) for c in captured])


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no answer in time"
