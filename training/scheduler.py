"""Scheduling of training rounds with APScheduler, in the app process.

A ``BackgroundScheduler`` checks every ``train_every_min`` minutes whether at least
``min_new_votes`` votes arrived since the last round that trained, and if so starts one. A
"Train now" request starts one at once. Never two rounds at once: a non-blocking lock guards
:meth:`TrainingScheduler.run_now`, whoever calls it.

The round itself runs in a child process (``python -m training.jobs``) by default, so that a
crash or out-of-memory in training cannot take the chat down; its adapter reaches serving only
through the registry.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from storage.db import Store

log = logging.getLogger(__name__)

JOB_ID = "rlhf-round"
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where `python -m training.jobs` resolves


def subprocess_round(args: list[str], log_path: Path, store: Store) -> Callable[[str], dict]:
    """A round function that runs ``python -m training.jobs ARGS --trigger T`` in a child
    process, its output appended to ``log_path``. If the child dies without finishing its round
    (killed, out of memory), the round is marked failed."""

    def run(trigger: str) -> dict:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.run(
                [sys.executable, "-m", "training.jobs", *args, "--trigger", trigger],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                check=False,
            )
        stale = store.running_round()
        if stale is not None:
            store.fail_stale_rounds(f"training process exited with code {proc.returncode}; see {log_path}")
        rounds = store.rounds(limit=1)
        return rounds[0] if rounds else {"status": "failed", "reason": f"exit code {proc.returncode}"}

    return run


class TrainingScheduler:
    """Starts training rounds on a schedule or on request, one at a time.

    Args:
        round_fn: runs one round given its trigger (``"schedule"`` or ``"manual"``) and returns
            the recorded round dict; may raise (logged, the scheduler keeps running).
        store: to count new votes.
        train_every_min: minutes between checks (> 0).
        min_new_votes: votes since the last round that trained needed to start a scheduled one.
    """

    def __init__(self, round_fn: Callable[[str], dict], store: Store, train_every_min: float, min_new_votes: int):
        if train_every_min <= 0:
            raise ValueError(f"train_every_min must be > 0, got {train_every_min}")
        self.round_fn = round_fn
        self.store = store
        self.train_every_min = train_every_min
        self.min_new_votes = min_new_votes
        self._round_lock = threading.Lock()
        self._scheduler = BackgroundScheduler(daemon=True)
        self.last_result: dict | None = None

    @property
    def busy(self) -> bool:
        """True while a round runs."""
        return self._round_lock.locked()

    def start(self) -> None:
        """Start the background scheduler with its one periodic job."""
        self._scheduler.add_job(
            self.scheduled_tick,
            "interval",
            minutes=self.train_every_min,
            id=JOB_ID,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def scheduled_tick(self) -> dict | None:
        """The periodic job: start a round if enough new votes arrived; else do nothing."""
        new = self.store.new_votes_since_last_round()
        if new < self.min_new_votes:
            log.info("scheduled round not started: %d new votes, need %d", new, self.min_new_votes)
            return None
        return self.run_now("schedule")

    def run_now(self, trigger: str = "manual") -> dict | None:
        """Run one round in the calling thread; returns its record, or None if a round is
        already running (the request is dropped, never queued)."""
        if not self._round_lock.acquire(blocking=False):
            log.info("round request (%s) ignored: a round is already running", trigger)
            return None
        try:
            self.last_result = self.round_fn(trigger)
            return self.last_result
        except Exception:  # noqa: BLE001 - logged with its traceback; the scheduler lives on
            log.exception("training round (%s) raised", trigger)
            return None
        finally:
            self._round_lock.release()

    def request_round(self) -> str:
        """Start a round in the background now ("Train now"); returns a message for the UI."""
        if self.busy:
            return "A training round is already running."
        threading.Thread(target=self.run_now, args=("manual",), name="train-now", daemon=True).start()
        return "Training round started; this tab refreshes when it ends."
