"""Clean resources: worker threads come and go without leaking SQLite connections (open
descriptors stay flat across bursts of requests), and ``Store.close()`` leaves ``chat.db``
holding everything on its own (the write-ahead log folded in)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading

from tests.conftest import add_votes

BURSTS = 10
THREADS = 6  # worker threads alive at once in a burst


def _descriptors(db_path) -> int:
    """Open descriptors of this process on the database file and its -wal / -shm files (other
    tests' servers may open and close unrelated ones meanwhile)."""
    names = {str(db_path), f"{db_path}-wal", f"{db_path}-shm"}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") in names
        except OSError:  # closed meanwhile
            pass
    return count


def _burst(store) -> None:
    """``THREADS`` new threads, all alive at once, each reading and writing the store."""
    ready = threading.Barrier(THREADS)

    def work(i):
        ready.wait()  # every thread holds its connection at the same time
        store.new_conversation(f"burst-{i}")
        store.voted_comparisons()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_descriptors_stay_flat_across_bursts_of_threads(store):
    store.new_conversation("main")  # this thread's own connection
    counts = []
    for _ in range(BURSTS):
        _burst(store)
        counts.append(_descriptors(store.path.resolve()))
    # ended threads' connections were closed, not kept (SQLite may hold a closed connection's
    # descriptors a while for reuse, so the count wobbles by a few; a leak adds a burst's worth
    # of connections every burst)
    assert counts[0] > 0 and max(counts) <= counts[0] + 4 * THREADS, counts
    assert store._connections.open_count() <= THREADS + 1  # the last burst's, and this thread's
    store.close()
    assert store._connections.open_count() == 0
    assert store.rounds() == [] and store._connections.open_count() == 1  # reopens lazily


def test_close_folds_the_write_ahead_log_into_chat_db(store, tmp_path):
    from storage.store import Store

    add_votes(store, 6)
    _burst(store)  # other threads' connections too
    other = Store(store.path)  # another process's store on the file (the training child, a second app)
    other.rounds()
    wal = store.path.with_name(store.path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0  # WAL mode: the writes sit in the log
    store.close()
    assert wal.stat().st_size == 0  # folded in although the other store still has the file open

    alone = tmp_path / "copy" / "chat.db"
    alone.parent.mkdir()
    shutil.copy(store.path, alone)  # the database file only, no -wal or -shm beside it
    with sqlite3.connect(alone) as db:
        assert db.execute("SELECT count(*) FROM comparisons WHERE choice IS NOT NULL").fetchone() == (6,)
        assert db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 2 + THREADS
    other.close()
