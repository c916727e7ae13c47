"""Per-thread SQLite connections, write transactions, UTC timestamps and JSON columns.

SQLite connections must not be shared between threads mid-transaction, so ``Connections``
hands every thread its own ``sqlite_utils.Database`` on the same file (WAL mode, 30 s busy
timeout, foreign keys on). Gradio workers, the scheduler thread and HTTP handlers can all
call the store concurrently; writers queue on SQLite's lock instead of failing. Worker
threads come and go, so the connection of a thread that has ended is closed when the next one
is opened: open connections never outnumber the live threads that used the store.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

BUSY_TIMEOUT_S = 30.0


class Connections:
    """One ``sqlite_utils.Database`` per thread for the SQLite file at ``path``.

    ``get()`` opens the calling thread's connection on first use, first closing those of
    threads that have ended; ``close()`` closes all of them (a thread that calls ``get()``
    afterwards gets a fresh one).
    """

    def __init__(self, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S):
        if str(path) == ":memory:":
            raise ValueError(
                "Store needs a database file: ':memory:' gives every thread its own empty "
                "database; pass a path such as tmp_path / 'chat.db'"
            )
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[weakref.ref, sqlite3.Connection]] = []  # (its thread, connection)
        self._generation = 0

    def get(self) -> sqlite_utils.Database:
        """The calling thread's database handle, opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.generation != self._generation:
            db = self._connect()
            self._local.db, self._local.generation = db, self._generation
        return db

    def _connect(self) -> sqlite_utils.Database:
        # check_same_thread=False only so close() may close it from another thread;
        # each connection is still used by the one thread that opened it.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, check_same_thread=False)
        db = sqlite_utils.Database(conn, execute_plugins=False)
        db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = NORMAL")  # durable across app crashes in WAL mode
        with self._lock:
            ended = [c for t, c in self._open if not _alive(t)]
            self._open = [(t, c) for t, c in self._open if _alive(t)]
            self._open.append((weakref.ref(threading.current_thread()), conn))
        for old in ended:  # no thread uses these any more
            old.close()
        return db

    def open_count(self) -> int:
        """How many connections are open now."""
        with self._lock:
            return len(self._open)

    def checkpoint(self, timeout_s: float = 2.0) -> bool:
        """Copy the write-ahead log into the database file and empty it
        (``PRAGMA wal_checkpoint(TRUNCATE)``, https://sqlite.org/pragma.html#pragma_wal_checkpoint)
        on a connection of its own, waiting at most ``timeout_s`` seconds for other connections'
        transactions; returns whether it completed (False while another process holds one)."""
        if not self.path.exists():
            return True
        conn = sqlite3.connect(self.path, timeout=timeout_s)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()
        return busy == 0

    def close(self) -> None:
        """Close every connection opened so far, from any thread."""
        with self._lock:
            conns, self._open = [c for _, c in self._open], []
            self._generation += 1
        for conn in conns:
            conn.close()


def _alive(thread_ref: weakref.ref) -> bool:
    """Whether the thread behind ``thread_ref`` still runs (a collected thread has ended)."""
    thread = thread_ref()
    return thread is not None and thread.is_alive()


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error) on this thread's connection.

    Taking the write lock up front means a read-then-write sequence can't fail halfway with
    ``SQLITE_BUSY``: concurrent writers wait up to the busy timeout instead. Nested use joins
    the outer transaction through a savepoint.
    """
    if db.conn.in_transaction:
        with db.atomic():
            yield db
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    db.conn.execute("COMMIT")


class UtcClock:
    """Strictly increasing ISO-8601 UTC timestamps with microseconds.

    Two events in the same process never share a timestamp, so ``voted_at > started_at``
    comparisons order them correctly. Strings sort chronologically.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: datetime | None = None

    def now(self) -> str:
        """Current time as ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``."""
        with self._lock:
            t = datetime.now(timezone.utc)
            if self._last is not None and t <= self._last:
                t = self._last + timedelta(microseconds=1)
            self._last = t
        return format_timestamp(t)


def format_timestamp(t: datetime) -> str:
    """Format an aware datetime as the stored UTC string (naive is taken as UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


def normalize_timestamp(value: str) -> str:
    """Parse any ISO-8601 timestamp and return it in the stored UTC format.

    Raises ``ValueError`` (saying the expected format) if ``value`` is not ISO-8601.
    """
    try:
        t = datetime.fromisoformat(value)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"expected an ISO-8601 timestamp such as '2025-01-31T12:00:00+00:00', got {value!r}"
        ) from e
    return format_timestamp(t)


def _finite(value: Any) -> Any:
    """``value`` with NaN and ±inf floats (not JSON) replaced by ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> str | None:
    """Encode a JSON column (``None`` stays SQL NULL; non-ASCII kept as is; NaN and ±inf, which
    JSON cannot hold, become null)."""
    return None if value is None else json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)


def loads(value: str | None) -> Any:
    """Decode a JSON column (SQL NULL becomes ``None``)."""
    return None if value is None else json.loads(value)


def decode_metrics(row: dict) -> dict:
    """A copy of a ``training_rounds`` / ``policy_versions`` row with its JSON columns
    (``metrics``, and a round's ``settings`` and ``progress``) decoded."""
    row = dict(row)
    row["metrics"] = loads(row["metrics"])
    for key in ("settings", "progress"):
        if key in row:
            row[key] = loads(row[key])
    return row
