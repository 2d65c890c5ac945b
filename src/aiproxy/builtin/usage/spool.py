"""The usage spool: an append-only file of usage rows the database has not taken yet.

One JSON object a line, in the order the calls ended. Rows land here when the
database is unreachable, when the in-memory queue is full, and at shutdown when the
last flush fails; the flusher replays them, in order, as soon as the database
answers, then deletes the file. Replaying is idempotent (each row has a unique
``uid`` and the insert skips ones already present), so a replay cut short by a crash
is simply done again from the start by the next process.

The file exists only while it holds rows: a healthy gateway never creates one.
Several worker processes may share one configured path: each holds an exclusive
``flock`` on the file it writes (``usage.spool``, else ``usage.spool.1``, ``.2``, …),
so two processes never interleave lines or delete each other's file; a file left by
a process that is gone is adopted (locked, replayed, deleted) by the next that looks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from aiproxy.builtin.usage.writer import fit

log = logging.getLogger("aiproxy.usage")
MAX_SLOTS = 64  #: worker processes that can share one spool path


class SpoolError(Exception):
    """The spool file cannot be opened or written (the message names it)."""


def _line(row: dict[str, Any]) -> bytes:
    """One row as a JSON line. A row JSON cannot spell as it is (a number past 64 bits
    from an upstream, a plugin's metadata keyed by numbers) is spooled as the table would
    take it: numbers cut to their columns, metadata made plain JSON (never a TypeError
    on the response path, which would lose this row and the queue)."""
    try:
        return orjson.dumps(row, default=str) + b"\n"
    except TypeError:
        fitted = fit(row)  # the insert's own fitting
        fitted["meta"] = orjson.loads(fitted.pop("metadata"))
        return orjson.dumps(fitted, default=str) + b"\n"


class Spool:
    """One process's spool file, locked for as long as it is open."""

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.base = path
        self.fsync = fsync
        self.path: Path = path
        self._file: IO[bytes] | None = None
        self.read_offset = 0  # bytes already replayed
        self.rows_written = 0  # rows appended by this process

    def slots(self) -> list[Path]:
        return [self.base if n == 0 else self.base.with_name(f"{self.base.name}.{n}")
                for n in range(MAX_SLOTS)]

    # ------------------------------------------------------------ claiming a file
    def check(self) -> None:
        """Fail now (start-up) if the spool's folder cannot be made or written."""
        folder = self.base.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"usage.spool_path: cannot create {folder}: {exc.strerror}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SpoolError(f"usage.spool_path: cannot write in {folder}")

    def adopt(self) -> bool:
        """Claim a spool file that holds rows and nobody holds (one left by a crash, an
        outage that outlived its process); True when one is now open for replay."""
        if self._file is not None:
            return self.pending()
        for path in self.slots():
            try:
                if path.stat().st_size == 0:
                    continue
            except FileNotFoundError:  # none, or another worker just replayed and deleted it
                continue
            if self._claim(path, create=False) and self.pending():
                log.info("usage spool %s holds rows from before; replaying them", path)
                return True
            self.close()
        return False

    def _open_for_writing(self) -> None:
        if self._file is not None:
            return
        self.check()
        for path in self.slots():
            if self._claim(path, create=True):
                return
        raise SpoolError(f"usage.spool_path: {self.base} and its {MAX_SLOTS - 1} numbered "
                         "siblings are all held by other processes")

    def _claim(self, path: Path, *, create: bool) -> bool:
        try:
            file = open(path, "ab+" if create else "rb+")  # held open (and locked) until close()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SpoolError(f"usage.spool_path: cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the holder may have emptied and deleted it between our open and our lock
            if os.fstat(file.fileno()).st_ino != os.stat(path).st_ino:
                raise OSError("replaced")
        except OSError:
            file.close()
            return False
        self.path, self._file, self.read_offset = path, file, 0
        self._end_torn_line()
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None

    def _end_torn_line(self) -> None:
        """A process that died mid-write left a line without its newline: end it, so the
        next row starts a line of its own (the torn one is reported and skipped on replay)."""
        assert self._file is not None
        size = self._file.seek(0, os.SEEK_END)
        if size:
            self._file.seek(size - 1)
            if self._file.read(1) != b"\n":
                self._file.seek(0, os.SEEK_END)
                self._file.write(b"\n")
                self._file.flush()

    # ------------------------------------------------------------ writing
    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` (one write, flushed to the OS: a process crash loses none of
        them; ``usage.fsync`` also survives a machine crash). Raises SpoolError."""
        if not rows:
            return
        self._open_for_writing()
        assert self._file is not None
        data = b"".join(map(_line, rows))
        try:
            self._file.seek(0, os.SEEK_END)
            self._file.write(data)
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise SpoolError(f"cannot write the usage spool {self.path}: {exc.strerror}") from None
        self.rows_written += len(rows)

    # ------------------------------------------------------------ replaying
    def pending(self) -> bool:
        """Are there rows not yet replayed?"""
        return self._file is not None and os.fstat(self._file.fileno()).st_size > self.read_offset

    def read(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Up to ``limit`` rows from the replay position, and the offset just past them
        (give it to :meth:`advance` once they are in the database)."""
        assert self._file is not None
        rows: list[dict[str, Any]] = []
        offset = self.read_offset
        self._file.seek(offset)
        while len(rows) < limit:
            line = self._file.readline()
            if not line or not line.endswith(b"\n"):
                break  # the end
            offset += len(line)
            if line.strip():
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.error("usage spool %s: skipped a torn line at byte %d (a crash mid-write)",
                              self.path, offset - len(line))
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        return rows, offset

    def advance(self, offset: int) -> None:
        """Rows up to ``offset`` are in the database; once every row is, delete the file
        (sync, no await in between: nothing was appended meanwhile) and adopt any other
        left behind."""
        self.read_offset = offset
        if self._file is not None and offset >= os.fstat(self._file.fileno()).st_size:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while locked: whoever opens the name next gets a new file
            self.close()
            self.read_offset = 0
            self.adopt()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every row in the current file (for tests and tooling)."""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as file:
            for line in file:
                with contextlib.suppress(orjson.JSONDecodeError):
                    yield orjson.loads(line)
