"""A running round's progress, to the log, to its database row and to a progress bar, and its
time budget.

:class:`RoundProgress` is told each stage as it starts (:data:`STAGES`: ``loading``, ``reward
model``, ``rejection sampling``, ``ppo``, ``gate``, ``publish``) and each PPO iteration as it
ends. It writes ``{"stage", "done", "total", "eta_s", "fraction"}`` to the round's row
(``Store.set_round_progress``; the Training tab shows it for the running round) and one log line
per report. The ETA is the PPO iterations left times the mean seconds per iteration so far (the
gate and publishing after it are not counted). ``fraction`` is :func:`progress_fraction`: the
share of PPO's iterations done (0 before PPO, 1 after it), PPO being most of a round's time.

With ``bar=True`` a stage that counts steps (PPO's iterations) also shows a tqdm bar on stderr,
the stage as its description; :func:`want_bar` is the rule ``python -m training.jobs`` applies
(stderr a terminal). The log lines stay one per report either way.

With a time budget (``--max-minutes``), :meth:`RoundProgress.ppo_iteration` answers whether PPO
must stop now: when the next iteration, at the mean pace so far, would end past the deadline.
PPO then ends at that iteration boundary, and the round gates and publishes what was trained.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STAGES = ("loading", "reward model", "rejection sampling", "ppo", "gate", "publish")  # a round's order
_BEFORE_PPO, _AFTER_PPO = STAGES[:STAGES.index("ppo")], STAGES[STAGES.index("ppo") + 1:]


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


def progress_fraction(progress: dict | None) -> float | None:
    """How far a round is, 0..1, from its row's ``progress``: the share of PPO's iterations done
    (``done / total`` during ``ppo``, clamped to [0, 1]); 0.0 in the stages before PPO
    (``loading``, ``reward model``, ``rejection sampling``) and 1.0 after it (``gate``,
    ``publish``: PPO is done, even when the time budget ended it early). None for no progress
    or a stage it does not know. PPO only, since it is most of a round's time; the stages
    before it count no steps."""
    if not progress:
        return None
    stage, total = progress.get("stage"), progress.get("total")
    if stage == "ppo":
        if not total or total <= 0:
            return 0.0
        return min(max(float(progress.get("done") or 0) / float(total), 0.0), 1.0)
    if stage in _BEFORE_PPO:
        return 0.0
    if stage in _AFTER_PPO:
        return 1.0
    return None


def want_bar(stream=None) -> bool:
    """Whether a round run from the command line shows a progress bar: only when ``stream``
    (default ``sys.stderr``) is a terminal. The app's round runs as a child whose stderr is the
    training log (:class:`training.scheduler.SubprocessRound`), never a terminal: no bar there,
    nor in any redirected output. (tqdm's own ``TQDM_DISABLE=1`` hides a bar on a terminal too.)"""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


class RoundProgress:
    """Progress reports of round ``round_id`` (``store`` may be None: log only).

    Args:
        max_minutes: the round's time budget in minutes, counted from construction (0: none).
        clock: seconds, monotonic (tests pass their own).
        bar: also show a tqdm bar (on ``bar_file``, default stderr) for each stage that counts
            steps, described by the stage's name; :meth:`close` ends it.
    """

    def __init__(self, store, round_id: int | None, max_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, bar: bool = False, bar_file=None):
        if max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {max_minutes}")
        self.store, self.round_id, self.clock = store, round_id, clock
        self.started = clock()
        self.deadline = self.started + 60.0 * max_minutes if max_minutes > 0 else None
        self.current = ""
        self._stage_start = self.started
        self.stopped_early = False
        self.show_bar, self.bar_file = bar, bar_file
        self.bar = None  # the current stage's tqdm bar, if any

    def _report(self, done: int, total: int | None, eta_s: float | None) -> None:
        progress = {"stage": self.current, "done": done, "total": total, "eta_s": eta_s}
        if self.store is not None and self.round_id is not None:
            try:
                self.store.set_round_progress(self.round_id, self.current, done, total, eta_s,
                                              fraction=progress_fraction(progress))
            except Exception:  # noqa: BLE001 - a progress report never fails the round
                log.warning("round %s: progress not recorded", self.round_id, exc_info=True)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        log.info("round %s: %s (%s elapsed)", self.round_id, describe(progress),
                 _clock_text(self.clock() - self.started))

    def _open_bar(self, total: int | None) -> None:
        """End the previous stage's bar; start one for this stage when it counts steps."""
        self.close()
        if self.show_bar and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.current, unit="it", file=self.bar_file or sys.stderr,
                            dynamic_ncols=True, leave=True)

    def close(self) -> None:
        """End the progress bar, if one is shown (the round ended or a new stage starts)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def stage(self, name: str, total: int | None = None) -> None:
        """A new stage starts (``total``: its steps, when it counts any)."""
        self.current, self._stage_start = name, self.clock()
        self._open_bar(total)
        self._report(0, total, None)

    def ppo_iteration(self, done: int, total: int) -> bool:
        """PPO finished iteration ``done`` of ``total`` (0: the first starts now, the pace is
        measured from here): report it; True when PPO must stop here (the next iteration would
        end past the time budget; never before the first or after the last)."""
        now = self.clock()
        if done == 0:
            self._stage_start = now
            if self.bar is not None:
                self.bar.reset(total=total)  # its rate counts from the first iteration too
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
