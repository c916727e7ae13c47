"""Training-round bookkeeping: one row per scheduled or manual training attempt.

A round is started as ``'running'`` and finished exactly once as ``'succeeded'``,
``'skipped'``, ``'failed'`` or ``'rejected'`` (trained, but the candidate lost its gate).
Mixed into ``storage.store.Store``; uses its ``db`` (per-thread handle), ``_now()`` and ``path``.

**Who owns a running round.** The process that starts a round takes an exclusive ``flock`` on
the data dir's ``round.lock`` (:attr:`storage.paths.DataDir.round_lock`) and holds it until it
finishes the round. The operating system releases it when that process dies, even by
``kill -9``. So, whoever asks — a second app on the same data dir, a restarted app while an
orphaned training child still runs, a round started by hand:

* a round can start only while no other process holds the lock (:class:`RoundAlreadyRunning`);
  rows left ``'running'`` then are stale (their process is gone) and are marked failed first;
* a round is finished by the process holding it, or by anyone once its process has died
  (:class:`RoundOwnedElsewhere` while it lives): a live round is never marked failed behind its
  back, and :meth:`RoundsMixin.owns_round` lets the runner check before it publishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import sqlite_utils

from storage.connection import decode_metrics, dumps, write_transaction
from storage.errors import RoundAlreadyRunning, RoundOwnedElsewhere, UnknownRound
from storage.paths import DataDir

ROUND_STATUSES = ("running", "succeeded", "skipped", "failed", "rejected")
FINISHED_STATUSES = ROUND_STATUSES[1:]
TRAINED_STATUSES = ("succeeded", "rejected")  # rounds that consumed the votes they saw


class RoundsMixin:
    """Methods on ``Store`` for the ``training_rounds`` table."""

    db: sqlite_utils.Database
    path: Path
    _round_locks: tuple[threading.Lock, dict[int, IO]]  # set by Store.__init__

    def _now(self) -> str:  # provided by Store
        raise NotImplementedError

    # -- the round lock --------------------------------------------------------------------
    def _round_state(self) -> tuple[threading.Lock, dict[int, IO]]:
        """``(guard, {round id: open lock file})`` of the rounds this store holds."""
        return self._round_locks

    def _take_round_lock(self) -> IO | None:
        """The data dir's round lock, taken without waiting (a new open file), or None when a
        live process (this one included, through another handle) holds it."""
        path = DataDir(self.path.parent).round_lock
        f = open(path, "a+")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    @staticmethod
    def _lock_holder(path: Path) -> str:
        try:
            return path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    @contextlib.contextmanager
    def _round_lock_for(self, round_id: int | None) -> Iterator[bool]:
        """The round lock for finishing ``round_id`` (None: any round): yields True when held —
        by this store for that round, or taken now (then released on exit) — and False when a
        live process holds it."""
        guard, held = self._round_state()
        with guard:
            mine = held.get(round_id) if round_id is not None else next(iter(held.values()), None)
        if mine is not None:
            yield True
            return
        f = self._take_round_lock()
        try:
            yield f is not None
        finally:
            if f is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                f.close()

    def _release_round(self, round_id: int) -> None:
        guard, held = self._round_state()
        with guard:
            f = held.pop(round_id, None)
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    def release_round_locks(self) -> None:
        """Let go of every round lock this store holds (``close()``; what the death of the
        process does): the rounds stay ``'running'`` until someone marks them stale."""
        guard, held = self._round_state()
        with guard:
            ids = list(held)
        for round_id in ids:
            self._release_round(round_id)

    def owns_round(self, round_id: int) -> bool:
        """True if this store started ``round_id``, holds its lock and it is still running:
        what a round checks before it publishes. Raises ``UnknownRound`` for an unknown id."""
        running = self.round(round_id)["status"] == "running"
        guard, held = self._round_state()
        with guard:
            return running and round_id in held

    def start_round(self, trigger: str, settings: dict | None = None) -> int:
        """Record a new round in status ``'running'`` and return its id (int).

        ``trigger`` says who started it, e.g. ``'schedule'`` or ``'manual'``; ``settings`` the
        JSON-able configuration it runs with, returned decoded as the row's ``settings``. This
        store then holds the data dir's round lock until :meth:`finish_round`; rows still
        ``'running'`` whose process is gone are marked failed first.

        Raises ``RoundAlreadyRunning`` if a live process (this one included) is running a
        round, ``ValueError`` if ``trigger`` is empty.
        """
        if not isinstance(trigger, str) or not trigger:
            raise ValueError("start_round needs a non-empty trigger such as 'schedule' or 'manual'")
        lock = self._take_round_lock()
        if lock is None:
            running = self.running_round()
            what = (f"round {running['id']} (trigger {running['trigger']!r}, started {running['started_at']})"
                    if running else "a round")
            raise RoundAlreadyRunning(
                f"{what} is still running in {self._lock_holder(DataDir(self.path.parent).round_lock)}; "
                "wait for it (a crashed round is failed by fail_stale_rounds() once its process is gone)")
        try:
            round_id = self._insert_round(trigger, settings)
        except BaseException:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()
            raise
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} (round {round_id})\n")
        lock.flush()
        guard, held = self._round_state()
        with guard:
            held[round_id] = lock
        return round_id

    def _insert_round(self, trigger: str, settings: dict | None) -> int:
        """Under the round lock: fail stale ``'running'`` rows, insert the new round."""
        with write_transaction(self.db) as db:
            db.execute(
                "UPDATE training_rounds SET status = 'failed', reason = ?, finished_at = ? WHERE status = 'running'",
                ["interrupted: the process running it ended", self._now()],
            )
            table = db.table("training_rounds")
            table.insert(
                {
                    "trigger": trigger,
                    "status": "running",
                    "reason": "",
                    "metrics": None,
                    "settings": dumps(settings),
                    "version": None,
                    "votes_used": 0,
                    "started_at": self._now(),
                    "finished_at": None,
                }
            )
            return int(table.last_pk)

    def finish_round(
        self,
        round_id: int,
        status: str,
        reason: str = "",
        metrics: dict | None = None,
        version: int | None = None,
        votes_used: int | None = None,
    ) -> dict:
        """Close a running round and return the updated row (dict, ``metrics`` decoded).

        ``status`` is one of ``'succeeded' | 'skipped' | 'failed' | 'rejected'``; ``reason`` is
        free text for the UI; ``metrics`` a JSON-able dict of namespaced figures
        (``objective/kl`` …); ``version`` the policy version the round produced;
        ``votes_used`` how many votes it trained on (left unchanged when ``None``). The round
        lock this store held for it is released.

        Raises ``ValueError`` for another status or a round already finished,
        ``UnknownRound`` (a ``KeyError``) for an unknown id, ``RoundOwnedElsewhere`` when a live
        process other than this store's holder runs the round (only it may finish it).
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(
                f"finish_round status must be one of {', '.join(FINISHED_STATUSES)}; got {status!r}"
            )
        updates: dict[str, Any] = {
            "status": status,
            "reason": reason or "",
            "metrics": dumps(metrics),
            "version": version,
            "finished_at": self._now(),
        }
        if votes_used is not None:
            updates["votes_used"] = int(votes_used)
        with self._round_lock_for(round_id) as held:
            if not held:
                raise RoundOwnedElsewhere(
                    f"round {round_id} is being run by {self._lock_holder(DataDir(self.path.parent).round_lock)}; "
                    "only that process may finish it")
            with write_transaction(self.db) as db:
                current = self.round(round_id)
                if current["status"] != "running":
                    raise ValueError(
                        f"round {round_id} already finished as {current['status']!r} "
                        f"({current['reason']!r}); a round is finished exactly once"
                    )
                db.table("training_rounds").update(round_id, updates)
        self._release_round(round_id)
        return self.round(round_id)

    def set_round_progress(self, round_id: int, stage: str, done: int = 0, total: int | None = None,
                           eta_s: float | None = None, fraction: float | None = None) -> bool:
        """Record how far a running round is: ``stage`` (``"loading"``, ``"reward model"``,
        ``"rejection sampling"``, ``"ppo"``, ``"gate"``, ``"publish"``), ``done`` of ``total`` steps of it, and the estimated seconds left of the
        round (``eta_s``; None: unknown), and how far the round is, 0..1 (``fraction``; None:
        unknown; :func:`training.progress.progress_fraction`). The row's ``progress`` becomes
        ``{"stage", "done", "total", "eta_s", "fraction", "updated_at"}``. A round no longer
        running is left as it is (returns False): a late report never rewrites a finished round.

        Raises ``ValueError`` for a ``fraction`` outside [0, 1].
        """
        if fraction is not None and not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1] or None, got {fraction!r}")
        progress = {"stage": stage, "done": int(done), "total": None if total is None else int(total),
                    "eta_s": None if eta_s is None else round(float(eta_s), 1),
                    "fraction": None if fraction is None else float(fraction), "updated_at": self._now()}
        cursor = self.db.execute(
            "UPDATE training_rounds SET progress = ? WHERE id = ? AND status = 'running'",
            [dumps(progress), round_id],
        )
        return cursor.rowcount == 1

    def round(self, round_id: int) -> dict:
        """One round as a dict (``metrics`` and ``settings`` decoded). Raises ``UnknownRound`` if absent."""
        try:
            row = self.db.table("training_rounds").get(round_id)
        except sqlite_utils.db.NotFoundError:
            raise UnknownRound(f"no training round with id {round_id!r}") from None
        return decode_metrics(row)

    def rounds(self, limit: int | None = 50) -> list[dict]:
        """The latest ``limit`` rounds (all when ``None``), newest first."""
        rows = self.db.table("training_rounds").rows_where(order_by="id DESC", limit=limit)
        return [decode_metrics(r) for r in rows]

    def running_round(self) -> dict | None:
        """The newest round still ``'running'``, or ``None``."""
        rows = list(
            self.db.table("training_rounds").rows_where(
                "status = 'running'", order_by="id DESC", limit=1
            )
        )
        return decode_metrics(rows[0]) if rows else None

    def fail_stale_rounds(self, reason: str = "interrupted: process restarted") -> int:
        """Mark every round left ``'running'`` by a process that is gone (a crash) as
        ``'failed'``; a round a live process runs (it holds the round lock: an orphaned
        training child, another app) is left alone. This store's own running rounds count as
        its to fail (their locks are released).

        Call at startup, before the scheduler runs. Returns how many rounds were marked.
        """
        with self._round_lock_for(None) as held:
            if not held:
                return 0
            cursor = self.db.execute(
                "UPDATE training_rounds SET status = 'failed', reason = ?, finished_at = ? "
                "WHERE status = 'running'",
                [reason, self._now()],
            )
        self.release_round_locks()
        return cursor.rowcount

    def _last_trained_round_start(self) -> str | None:
        """``started_at`` of the newest round that trained (succeeded or rejected), or None."""
        row = self.db.execute(
            "SELECT MAX(started_at) FROM training_rounds WHERE status IN (?, ?)",
            list(TRAINED_STATUSES),
        ).fetchone()
        return row[0]
