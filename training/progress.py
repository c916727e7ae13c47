"""A running round's progress, to the log and to its database row, and its time budget.

:class:`RoundProgress` is told each stage as it starts (``reward model``, ``rejection
sampling``, ``ppo``, ``gate``, ``publish``) and each PPO iteration as it ends. It writes
``{"stage", "done", "total", "eta_s"}`` to the round's row (``Store.set_round_progress``; the
Training tab's rounds table shows it for the running round) and one log line per report. The ETA is the PPO iterations left times
the mean seconds per iteration so far (the gate and publishing after it are not counted).

With a time budget (``--max-minutes``), :meth:`RoundProgress.ppo_iteration` answers whether PPO
must stop now: when the next iteration, at the mean pace so far, would end past the deadline.
PPO then ends at that iteration boundary, and the round gates and publishes what was trained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def describe(progress: dict | None) -> str:
    """A round row's ``progress`` in words: ``"ppo 4/16, ETA 2m10s"`` (empty for None)."""
    if not progress:
        return ""
    part = f" {progress.get('done', 0)}/{progress['total']}" if progress.get("total") else ""
    eta = f", ETA {_clock_text(progress['eta_s'])}" if progress.get("eta_s") is not None else ""
    return f"{progress.get('stage', '')}{part}{eta}"


class RoundProgress:
    """Progress reports of round ``round_id`` (``store`` may be None: log only).

    Args:
        max_minutes: the round's time budget in minutes, counted from construction (0: none).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, store, round_id: int | None, max_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        if max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {max_minutes}")
        self.store, self.round_id, self.clock = store, round_id, clock
        self.started = clock()
        self.deadline = self.started + 60.0 * max_minutes if max_minutes > 0 else None
        self.current = ""
        self._stage_start = self.started
        self.stopped_early = False

    def _report(self, done: int, total: int | None, eta_s: float | None) -> None:
        if self.store is not None and self.round_id is not None:
            try:
                self.store.set_round_progress(self.round_id, self.current, done, total, eta_s)
            except Exception:  # noqa: BLE001 - a progress report never fails the round
                log.warning("round %s: progress not recorded", self.round_id, exc_info=True)
        log.info("round %s: %s (%s elapsed)", self.round_id,
                 describe({"stage": self.current, "done": done, "total": total, "eta_s": eta_s}),
                 _clock_text(self.clock() - self.started))

    def stage(self, name: str, total: int | None = None) -> None:
        """A new stage starts (``total``: its steps, when it counts any)."""
        self.current, self._stage_start = name, self.clock()
        self._report(0, total, None)

    def ppo_iteration(self, done: int, total: int) -> bool:
        """PPO finished iteration ``done`` of ``total`` (0: the first starts now, the pace is
        measured from here): report it; True when PPO must stop here (the next iteration would
        end past the time budget; never before the first or after the last)."""
        now = self.clock()
        if done == 0:
            self._stage_start = now
            self._report(0, total, None)
            return False
        per_iteration = (now - self._stage_start) / max(done, 1)
        self._report(done, total, per_iteration * (total - done))
        if self.deadline is not None and done < total and now + per_iteration > self.deadline:
            self.stopped_early = True
            log.info("round %s: time budget reached after PPO iteration %d/%d; gating what was trained",
                     self.round_id, done, total)
            return True
        return False
