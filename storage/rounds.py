"""Training-round bookkeeping: one row per scheduled or manual training attempt.

A round is started as ``'running'`` and finished exactly once as ``'succeeded'``,
``'skipped'``, ``'failed'`` or ``'rejected'`` (trained, but the candidate lost its gate).
Mixed into ``storage.store.Store``; uses its ``db`` (per-thread handle) and ``_now()``.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from storage.connection import decode_metrics, dumps, write_transaction
from storage.errors import RoundAlreadyRunning, UnknownRound

ROUND_STATUSES = ("running", "succeeded", "skipped", "failed", "rejected")
FINISHED_STATUSES = ROUND_STATUSES[1:]
TRAINED_STATUSES = ("succeeded", "rejected")  # rounds that consumed the votes they saw


class RoundsMixin:
    """Methods on ``Store`` for the ``training_rounds`` table."""

    db: sqlite_utils.Database

    def _now(self) -> str:  # provided by Store
        raise NotImplementedError

    def start_round(self, trigger: str, settings: dict | None = None) -> int:
        """Record a new round in status ``'running'`` and return its id (int).

        ``trigger`` says who started it, e.g. ``'schedule'`` or ``'manual'``; ``settings`` the
        JSON-able configuration it runs with, returned decoded as the row's ``settings``.
        Raises ``RoundAlreadyRunning`` if another round is still ``'running'`` (after a crash,
        call ``fail_stale_rounds`` at startup), ``ValueError`` if ``trigger`` is empty.
        """
        if not isinstance(trigger, str) or not trigger:
            raise ValueError("start_round needs a non-empty trigger such as 'schedule' or 'manual'")
        with write_transaction(self.db) as db:
            running = db.execute(
                "SELECT id, trigger, started_at FROM training_rounds WHERE status = 'running' "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if running:
                raise RoundAlreadyRunning(
                    f"round {running[0]} (trigger {running[1]!r}, started {running[2]}) is still "
                    "running; wait for it, or call fail_stale_rounds() if it was left by a crash"
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
        ``votes_used`` how many votes it trained on (left unchanged when ``None``).
        Raises ``ValueError`` for another status or a round already finished,
        ``UnknownRound`` (a ``KeyError``) for an unknown id.
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
        with write_transaction(self.db) as db:
            current = self.round(round_id)
            if current["status"] != "running":
                raise ValueError(
                    f"round {round_id} already finished as {current['status']!r} "
                    f"({current['reason']!r}); a round is finished exactly once"
                )
            db.table("training_rounds").update(round_id, updates)
        return self.round(round_id)

    def set_round_progress(self, round_id: int, stage: str, done: int = 0, total: int | None = None,
                           eta_s: float | None = None) -> bool:
        """Record how far a running round is: ``stage`` (``"loading"``, ``"reward model"``,
        ``"rejection sampling"``, ``"ppo"``, ``"gate"``, ``"publish"``), ``done`` of ``total`` steps of it, and the estimated seconds left of the
        round (``eta_s``; None: unknown). A round no longer running is left as it is (returns
        False): a late report never rewrites a finished round."""
        progress = {"stage": stage, "done": int(done), "total": None if total is None else int(total),
                    "eta_s": None if eta_s is None else round(float(eta_s), 1), "updated_at": self._now()}
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
        """Mark every round left ``'running'`` (e.g. by a crash) as ``'failed'``.

        Call at startup, before the scheduler runs. Returns how many rounds were marked.
        """
        cursor = self.db.execute(
            "UPDATE training_rounds SET status = 'failed', reason = ?, finished_at = ? "
            "WHERE status = 'running'",
            [reason, self._now()],
        )
        return cursor.rowcount

    def _last_trained_round_start(self) -> str | None:
        """``started_at`` of the newest round that trained (succeeded or rejected), or None."""
        row = self.db.execute(
            "SELECT MAX(started_at) FROM training_rounds WHERE status IN (?, ?)",
            list(TRAINED_STATUSES),
        ).fetchone()
        return row[0]
