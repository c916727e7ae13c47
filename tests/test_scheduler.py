"""The training scheduler's reliability: a raising job is logged with its traceback, recorded and
survived; a killed round child is recorded as failed and its staging is removed; one schedule
per data directory, even when the app factory runs twice in one process (reload) or two
processes share the directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage.paths import DataDir
from storage.store import open_store
from training.scheduler import JOB_ID, SubprocessRound, TrainingScheduler

WAIT_S = 120  # only a deadline against hangs; nothing asserts on durations


def _scheduler_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "APScheduler" and t.is_alive())


def test_a_raising_job_is_logged_recorded_and_the_schedule_keeps_running(tmp_path, caplog):
    store = open_store(tmp_path / "data")
    calls, second_call = [], threading.Event()

    def flaky_round(trigger):
        calls.append(trigger)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        second_call.set()
        return {"status": "succeeded"}

    # a tick every 0.3 s, no votes needed: the periodic job itself must survive the exception
    scheduler = TrainingScheduler(flaky_round, store, train_every_min=0.005, min_new_votes=0)
    with caplog.at_level("ERROR", logger="training.scheduler"):
        assert scheduler.start()
        try:
            assert second_call.wait(WAIT_S), "the schedule stopped after the job raised"
        finally:
            scheduler.shutdown()
    assert calls[:2] == ["schedule", "schedule"]
    # logged with its traceback …
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert errors and "CUDA out of memory" in caplog.text and "Traceback" in caplog.text
    assert "CUDA out of memory" in scheduler.last_error
    # … and recorded, so the Training tab shows it
    failed = [r for r in store.rounds() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["reason"] == "RuntimeError: CUDA out of memory (simulated)"
    assert failed[0]["trigger"] == "schedule"
    assert store.running_round() is None


def test_a_raising_job_does_not_touch_a_round_that_another_process_runs(tmp_path):
    store = open_store(tmp_path / "data")
    theirs = store.start_round("schedule")  # e.g. another app on this data dir

    def boom(trigger):
        raise RuntimeError("refused")

    assert TrainingScheduler(boom, store, 60, 0).run_now("manual") is None
    assert store.round(theirs)["status"] == "running"
    assert [r["id"] for r in store.rounds()] == [theirs]


# A stand-in for `python -m training.jobs`: records its round as running, writes a reward model
# and half an adapter into staging (as a killed save would), says where, then hangs until killed.
FAKE_ROUND = r"""
import sys, time
from pathlib import Path
from storage.paths import DataDir
from storage.registry import AdapterRegistry, RewardModelRegistry
from storage.store import open_store
data, marker = DataDir(sys.argv[1]), Path(sys.argv[2])
store = open_store(data)
store.start_round(sys.argv[-1])
rm_staging = RewardModelRegistry(data).staging_dir()
(rm_staging / "adapter_config.json").write_text("{}")
(rm_staging / "adapter_model.safetensors").write_bytes(b"\0" * 10)
staging = AdapterRegistry(data, store).staging_dir()
(staging / "adapter_config.json").write_text("{}")
(staging / "adapter_model.safetensors").write_bytes(b"\0" * 10)
marker.write_text(str(staging) + "\n" + str(rm_staging))
time.sleep(600)
"""


def test_kill_9_of_the_round_child_fails_its_round_and_removes_its_staging(tmp_path):
    data = DataDir(tmp_path / "data")
    store = open_store(data)
    marker = tmp_path / "staging-written"
    round_fn = SubprocessRound(
        [str(data.root), str(marker)], data, store, command=[sys.executable, "-c", FAKE_ROUND],
    )  # fmt: skip
    scheduler = TrainingScheduler(round_fn, store, 60, 0)
    runner = threading.Thread(target=scheduler.run_now, args=("manual",))
    runner.start()
    proc = None
    for _ in range(WAIT_S * 20):
        if marker.exists() and round_fn.pid is not None:
            proc = round_fn.pid
            break
        threading.Event().wait(0.05)
    assert proc is not None, data.training_log.read_text()
    staging, rm_staging = map(Path, marker.read_text().splitlines())
    assert staging.is_dir() and rm_staging.is_dir() and store.running_round() is not None
    os.kill(proc, signal.SIGKILL)
    runner.join(WAIT_S)
    assert not runner.is_alive()
    result = scheduler.last_result
    assert result["status"] == "failed" and "code -9" in result["reason"]
    assert store.running_round() is None
    assert not staging.exists(), "the half-written staging directory was left behind"
    assert not rm_staging.exists(), "the reward model's staging directory was left behind"
    assert store.versions() == []  # nothing was published
    assert not scheduler.busy


def test_one_schedule_per_data_dir_in_one_process(tmp_path):
    store = open_store(tmp_path / "data")
    before = _scheduler_threads()
    first = TrainingScheduler(lambda t: {}, store, 60, 20)
    second = TrainingScheduler(lambda t: {}, open_store(tmp_path / "data"), 60, 20)
    try:
        assert first.start()
        assert not second.start()  # standby: the data dir is scheduled already
        assert first.start()  # starting again only replaces the job
        assert [j.id for j in first.jobs()] == [JOB_ID] and second.jobs() == []
        assert _scheduler_threads() == before + 1
        first.shutdown()  # releases the lock: the next app may take over
        assert second.start() and [j.id for j in second.jobs()] == [JOB_ID]
    finally:
        first.shutdown()
        second.shutdown()
    assert _scheduler_threads() == before


def test_the_schedule_lock_holds_across_processes(tmp_path):
    store = open_store(tmp_path / "data")
    scheduler = TrainingScheduler(lambda t: {}, store, 60, 20)
    probe = (
        "import fcntl, sys; f = open(sys.argv[1], 'a+')\n"
        "try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError: sys.exit(3)\n"
    )
    try:
        assert scheduler.start()
        held = subprocess.run([sys.executable, "-c", probe, str(scheduler.lock_path)], check=False)
        assert held.returncode == 3
    finally:
        scheduler.shutdown()
    free = subprocess.run([sys.executable, "-c", probe, str(scheduler.lock_path)], check=False)
    assert free.returncode == 0


@pytest.mark.slow
def test_app_factory_twice_leaves_one_scheduler_with_one_job(tiny_model_dir, tmp_path):
    from app import AppConfig, build_app

    config = AppConfig(model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), max_new_tokens=2)
    before = _scheduler_threads()
    _, first = build_app(config)
    _, second = build_app(config)  # a reload: same process, same data dir
    try:
        started = [s.start() for s in (first, second)]
        assert started == [True, False]
        assert sum(len(s.jobs()) for s in (first, second)) == 1
        assert _scheduler_threads() == before + 1
    finally:
        first.shutdown()
        second.shutdown()


@pytest.mark.slow
def test_app_started_elsewhere_trains_in_its_own_data_dir(tiny_model_dir, tmp_path, monkeypatch):
    # relative --data-dir and --model, app started outside the project: the training child (run
    # in the project directory) must still read and record in the app's own database
    import os

    from app import AppConfig, build_app

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = AppConfig(model=os.path.relpath(tiny_model_dir, elsewhere), data_dir="rel-data", max_new_tokens=2)
    _, scheduler = build_app(config)
    try:
        result = scheduler.round_fn("manual")
    finally:
        scheduler.shutdown()
    assert result["status"] == "skipped" and "too few votes" in result["reason"], result
    assert (elsewhere / "rel-data" / "chat.db").is_file()


def test_train_now_with_too_few_votes_says_skipped_and_starts_nothing(tiny_model_dir, tmp_path):
    # "Train now" answers with what will happen: the skip and its counts, recorded as a skipped
    # round, and no training child started; with enough votes it starts one
    from app import AppConfig, build_app
    from tests.conftest import add_votes
    from training.round import RoundConfig

    config = AppConfig(model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), max_new_tokens=2,
                       round=RoundConfig(min_votes=4))
    demo, scheduler = build_app(config)
    store = demo.rlhf_store
    add_votes(store, 3)
    try:
        message = scheduler.request_round()
        assert message.startswith("Skipped: too few votes: 3 A/B votes, 4 needed"), message
        assert scheduler.round_fn.pid is None and not scheduler.busy  # no child, nothing running
        [row] = store.rounds()
        assert row["status"] == "skipped" and row["trigger"] == "manual" and "3 A/B votes, 4 needed" in row["reason"]
        add_votes(store, 1)
        assert scheduler.preflight() is None  # 4 A/B votes: this one would train
    finally:
        scheduler.shutdown()
