"""Scheduling of training rounds with APScheduler, in the app process.

A ``BackgroundScheduler`` checks every ``train_every_min`` minutes whether at least
``min_new_votes`` votes arrived since the last round that trained, and if so starts one. A
"Train now" request starts one at once. Never two rounds at once: a non-blocking lock guards
:meth:`TrainingScheduler.run_now`, whoever calls it, and the store refuses a second running
round across processes.

One schedule per data directory: :meth:`TrainingScheduler.start` takes an exclusive
``flock`` on ``DATA/scheduler.lock``. A second app built on the same data directory — a
reload in the same process, or a second process — finds the lock held and stays on standby
(it still runs "Train now" rounds, which the store serializes). The lock lives in the data
directory, not in a module-level registry, because what must be unique is "who schedules
rounds for these votes", and the operating system releases it when its holder dies, even by
``kill -9``.

The round itself runs in a child process (``python -m training.jobs``) by default, so that a
crash or out-of-memory in training cannot take the chat down; its adapter reaches serving only
through the registry. The child dies with the app (Linux: the parent-death signal, SIGTERM,
which ``training.jobs`` turns into a failed round), and the data dir's round lock
(:mod:`storage.rounds`) keeps any other process from starting a round beside one that runs,
or from marking it failed while it lives.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from storage.errors import RoundAlreadyRunning, RoundOwnedElsewhere
from storage.paths import DataDir
from storage.registry import clean_staging
from storage.store import Store

log = logging.getLogger(__name__)

JOB_ID = "rlhf-round"
TRAINING_NICE = 10  # niceness of the training child process
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where `python -m training.jobs` resolves


PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a process gets when its parent dies (Linux)


def _child_setup(parent: int) -> Callable[[], None]:
    """What runs in the training child before exec: nice 10, so chat decoding gets the CPU
    first; on Linux, SIGTERM when the app dies (``prctl(PR_SET_PDEATHSIG)``, kept across exec),
    so a ``kill -9`` of the app never leaves a round training behind it; if the app already died
    between fork and here, the child exits at once."""

    def setup() -> None:
        os.nice(TRAINING_NICE)
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

    return setup


class SubprocessRound:
    """A round function that runs ``COMMAND ARGS --trigger T`` in a child process (by default
    ``python -m training.jobs``), its output appended to the data dir's training log.

    If the child dies without finishing the round it started (killed, out of memory), that
    round — and only that one, never another process's — is marked failed, and the staging
    directories it left (adapter and reward model) are deleted: never published, never served.

    Args:
        args: flags for ``training.jobs`` (``--data-dir``, ``--model``, …).
        data_dir: the data dir the child trains in (its log, its staging areas).
        store: the store the child records its round in.
        command: the program to run instead of ``python -m training.jobs``
            (:func:`launcher_command`: under torchrun; tests: another program).
    """

    def __init__(
        self,
        args: list[str],
        data_dir: DataDir,
        store: Store,
        command: list[str] | None = None,
    ):
        self.args = list(args)
        self.data_dir = data_dir
        self.log_path = data_dir.training_log
        self.store = store
        self.command = command or [sys.executable, "-m", "training.jobs"]
        self.proc: subprocess.Popen | None = None  # the running child, if any

    @property
    def pid(self) -> int | None:
        """Process id of the running child, or None between rounds."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _last_round_id(self) -> int:
        newest = self.store.rounds(limit=1)
        return newest[0]["id"] if newest else 0

    def __call__(self, trigger: str) -> dict:
        before = self._last_round_id()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.command, *self.args, "--trigger", trigger],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                # training yields the CPU to chat (bench.serving compares the priorities), and
                # dies with the app
                preexec_fn=_child_setup(os.getpid()) if hasattr(os, "nice") else None,
            )
            try:
                code = self.proc.wait()
            finally:
                self.proc = None
        reason = f"training process exited with code {code}; see {self.log_path}"
        mine = [r for r in self.store.rounds(limit=20) if r["id"] > before]  # newest first
        for r in mine:
            if r["status"] == "running":
                log.error("round %s: %s", r["id"], reason)
                try:
                    self.store.finish_round(r["id"], "failed", reason=reason)
                except (RoundOwnedElsewhere, ValueError):  # a live process runs it, or it ended meanwhile
                    log.warning("round %s was not marked failed: another process runs or finished it", r["id"])
        if code != 0 and self.store.running_round() is None:
            removed = clean_staging(self.data_dir)
            if removed:
                log.warning("removed %d staging directories left by the failed round", removed)
        if mine:
            return self.store.round(mine[0]["id"])  # newest first
        return {"status": "failed", "reason": reason}

    def terminate(self) -> None:
        """Ask a running child to stop (SIGTERM); its round is then recorded as failed."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()


LAUNCHERS = {  # a launcher's command → the module that is that command, run by this interpreter
    ("torchrun",): "torch.distributed.run",
    ("accelerate", "launch"): "accelerate.commands.launch",
}


def launcher_command(launcher: str) -> list[str]:
    """The command that starts a round's processes: ``python -m training.jobs`` for an empty
    ``launcher``; for ``"torchrun --nproc_per_node 2"`` or ``"accelerate launch --multi_gpu --num_processes
    2"``, that launcher with its options, run as a module of this interpreter (the app's virtual
    environment, whatever ``PATH`` says), then ``-m training.jobs``: a data-parallel round
    (:mod:`training.distributed`).

    Raises:
        ValueError: ``launcher`` is not torchrun or accelerate launch (only these two are known
            to start ``training.jobs`` as a process group), or cannot be split into words.
    """
    words = shlex.split(launcher)
    if not words:
        return [sys.executable, "-m", "training.jobs"]
    for head, module in LAUNCHERS.items():
        if tuple(words[:len(head)]) == head:
            return [sys.executable, "-m", module, *words[len(head):], "-m", "training.jobs"]
    known = " or ".join(f'"{" ".join(h)} …"' for h in LAUNCHERS)
    raise ValueError(f"--round-launcher {launcher!r}: expected {known}, e.g. \"torchrun --nproc_per_node 2\"")


def subprocess_round(args: list[str], data_dir: DataDir, store: Store, launcher: str = "") -> SubprocessRound:
    """A :class:`SubprocessRound` running ``python -m training.jobs ARGS``, or that under
    ``launcher`` (:func:`launcher_command`)."""
    return SubprocessRound(args, data_dir, store, command=launcher_command(launcher))


class TrainingScheduler:
    """Starts training rounds on a schedule or on request, one at a time.

    Args:
        round_fn: runs one round given its trigger (``"schedule"`` or ``"manual"``) and returns
            the recorded round dict; may raise (logged with its traceback and recorded as a
            failed round; the scheduler keeps running).
        store: to count new votes and record failures.
        train_every_min: minutes between checks (> 0).
        min_new_votes: votes since the last round that trained needed to start a scheduled one.
        lock_path: the file whose ``flock`` makes this the one scheduler of its data
            directory (default: the lock of the data dir that holds the store's database).
        preflight: returns why a round would be skipped now (None: it would train), asked by
            "Train now" before a round starts so its answer says what will happen; the app
            passes :func:`training.round_start.skip_reason`. None: not asked.
    """

    def __init__(
        self,
        round_fn: Callable[[str], dict],
        store: Store,
        train_every_min: float,
        min_new_votes: int,
        lock_path: Path | None = None,
        preflight: Callable[[], str | None] | None = None,
    ):
        if train_every_min <= 0:
            raise ValueError(f"train_every_min must be > 0, got {train_every_min}")
        self.round_fn = round_fn
        self.store = store
        self.train_every_min = train_every_min
        self.min_new_votes = min_new_votes
        self.preflight = preflight
        self.lock_path = Path(lock_path) if lock_path else DataDir(Path(store.path).parent).scheduler_lock
        self._round_lock = threading.Lock()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._lock_file = None
        self.last_result: dict | None = None
        self.last_error: str | None = None  # traceback of the last round that raised

    @property
    def busy(self) -> bool:
        """True while a round started by this scheduler runs."""
        return self._round_lock.locked()

    @property
    def running(self) -> bool:
        """True when this scheduler owns the schedule of its data directory."""
        return self._scheduler.running

    def jobs(self) -> list:
        """The APScheduler jobs of this scheduler (one when running, none on standby)."""
        return self._scheduler.get_jobs()

    def _acquire(self) -> bool:
        """Take the data directory's scheduler lock without waiting; False if held."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")  # noqa: SIM115 - held open while the lock is held
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            log.warning(
                "training rounds for %s are already scheduled (lock %s held by %s); this app "
                "stays on standby: chat and Train now work, the schedule runs there",
                self.lock_path.parent, self.lock_path, holder,
            )  # fmt: skip
            return False
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._lock_file = f
        return True

    def start(self) -> bool:
        """Start the background scheduler with its one periodic job; returns False (standby)
        if another scheduler already owns this data directory. Calling it again only
        replaces the job."""
        if not self._scheduler.running and not self._acquire():
            return False
        self._scheduler.add_job(
            self.scheduled_tick,
            "interval",
            minutes=self.train_every_min,
            id=JOB_ID,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )
        if not self._scheduler.running:
            self._scheduler.start()
        return True

    def shutdown(self) -> None:
        """Stop the schedule, stop a running child round and release the data-dir lock."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        terminate = getattr(self.round_fn, "terminate", None)
        if terminate is not None:
            terminate()
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def scheduled_tick(self) -> dict | None:
        """The periodic job: start a round if enough new votes arrived; else do nothing."""
        new = self.store.new_votes_since_last_round()
        if new < self.min_new_votes:
            log.debug("scheduled round not started: %d new votes, need %d", new, self.min_new_votes)
            return None
        return self.run_now("schedule")

    def run_now(self, trigger: str = "manual") -> dict | None:
        """Run one round in the calling thread; returns its record, or None if a round is
        already running (the request is dropped, never queued) or the round raised."""
        if not self._round_lock.acquire(blocking=False):
            log.info("round request (%s) ignored: a round is already running", trigger)
            return None
        try:
            log.info("training round (%s) started", trigger)
            self.last_result = result = self.round_fn(trigger)
            if isinstance(result, dict):
                log.info("training round %s (%s) %s: %s", result.get("id", "?"), trigger, result.get("status"),
                         result.get("reason") or "")
            return result
        except Exception as exc:  # noqa: BLE001 - logged with its traceback; the scheduler lives on
            self.last_error = traceback.format_exc()
            log.exception("training round (%s) raised", trigger)
            self._record_failure(trigger, exc)
            return None
        finally:
            self._round_lock.release()

    def _record_failure(self, trigger: str, exc: Exception) -> None:
        """Record a round whose function raised as a failed round (when none is running)."""
        try:
            if self.store.running_round() is not None:
                return
            round_id = self.store.start_round(trigger)
            self.store.finish_round(round_id, "failed", reason=f"{exc.__class__.__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the store itself is failing; the log has it
            log.exception("could not record the failed round (%s)", trigger)

    def request_round(self) -> str:
        """Start a round in the background now ("Train now"); returns a message for the UI:
        that it started, that one already runs, or ``"Skipped: <reason>."`` when ``preflight``
        says it would be skipped (recorded as a skipped round; nothing is started). A round left
        ``'running'`` by a process that has died is marked failed first."""
        if not self.busy:
            self.store.fail_stale_rounds("interrupted: the process running it ended")
        if self.busy or self.store.running_round() is not None:
            return "A training round is already running."
        skip = self.preflight() if self.preflight is not None else None
        if skip is not None:  # recorded like a round that skipped itself, without starting one
            if not self._round_lock.acquire(blocking=False):
                return "A training round is already running."
            try:
                self.store.finish_round(self.store.start_round("manual"), "skipped", reason=skip)
            except RoundAlreadyRunning:  # another process started one meanwhile
                return "A training round is already running."
            finally:
                self._round_lock.release()
            log.info("round (manual) skipped: %s", skip)
            return f"Skipped: {skip}."
        threading.Thread(target=self.run_now, args=("manual",), name="train-now", daemon=True).start()
        return "Training round started; this tab refreshes when it ends."
