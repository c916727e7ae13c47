"""One round at a time, whoever starts it: the data dir's round lock (``storage.rounds``) with
real processes and a real SQLite file. A ``kill -9`` of the app takes its training child with
it; a round a live process runs (an orphan, another app) is never marked failed and never gets
a second round beside it; two apps hammering one data dir leave the rounds table true."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.errors import RoundAlreadyRunning, RoundOwnedElsewhere
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import open_store
from tests.test_registry import write_adapter
from training.scheduler import PROJECT_ROOT

WAIT_S = 30

# an app in miniature: its scheduler's SubprocessRound runs a "training child" that starts a
# round, says its pid, and trains (sleeps) until it is stopped
APP = r"""
import sys
from storage.paths import DataDir
from storage.store import open_store
from training.scheduler import SubprocessRound
CHILD = '''
import os, sys, time
from pathlib import Path
from storage.store import open_store
store = open_store(sys.argv[1])
store.start_round("schedule")
Path(sys.argv[2]).write_text(str(os.getpid()))
time.sleep(600)
'''
data = DataDir(sys.argv[1])
SubprocessRound([str(data.root), sys.argv[2]], data, open_store(data), command=[sys.executable, "-c", CHILD])("schedule")
"""

# a round run by some other live process (an orphaned child, a second app, a round by hand):
# it starts a round, says so, waits for a go file, then publishes its adapter and finishes
ORPHAN = r"""
import sys, time
from pathlib import Path
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import open_store
from tests.test_registry import write_adapter
data, said, go = DataDir(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
store = open_store(data)
registry = AdapterRegistry(data, store)
round_id = store.start_round("manual")
said.write_text(str(round_id))
while not go.exists():
    time.sleep(0.02)
version = registry.publish(write_adapter(registry.staging_dir(), "o"), parent=0, round_id=round_id, metrics={})
store.finish_round(round_id, "succeeded", version=version)
"""

# one of two apps on one data dir: at start it fails stale rounds (as app.py does), then keeps
# trying to run short rounds; it reports every error
HAMMER = r"""
import sys, time
from storage.errors import RoundAlreadyRunning
from storage.store import open_store
store = open_store(sys.argv[1])
ran = 0
for i in range(int(sys.argv[2])):
    store.fail_stale_rounds("restart")
    try:
        round_id = store.start_round("schedule")
    except RoundAlreadyRunning:
        time.sleep(0.003)
        continue
    time.sleep(0.01)
    store.finish_round(round_id, "succeeded")
    ran += 1
    time.sleep(0.005)  # a scheduler waits before the next round: the other app gets its turn
print(ran)
"""


def _python(script: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=PROJECT_ROOT, **kw)


def _wait_for(path: Path, proc: subprocess.Popen) -> str:
    for _ in range(WAIT_S * 50):
        if path.exists() and path.read_text():
            return path.read_text()
        assert proc.poll() is None, f"the process ended with {proc.returncode}"
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def _alive(pid: int) -> bool:
    """True while any thread of process ``pid`` runs (a zombie no init has reaped yet is dead;
    its files, locks included, are closed once its last thread has gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            state = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_of_the_app_stops_its_training_child_and_the_restart_fails_the_round(tmp_path):
    data = DataDir(tmp_path / "data")
    open_store(data).close()
    said = tmp_path / "child-pid"
    app = _python(APP, data.root, said)
    child = int(_wait_for(said, app))
    assert _alive(child)
    app.send_signal(signal.SIGKILL)
    app.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(child), "the training child outlived the app"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
    store = open_store(data)  # the restarted app
    assert store.fail_stale_rounds("the app stopped") == 1
    assert store.running_round() is None
    store.finish_round(store.start_round("manual"), "skipped")  # and rounds run again


def test_a_restarted_app_leaves_a_live_orphan_round_alone_and_runs_none_beside_it(tmp_path):
    data = DataDir(tmp_path / "data")
    store = open_store(data)
    registry = AdapterRegistry(data, store)
    registry.publish(write_adapter(registry.staging_dir(), "0"), parent=None, round_id=None, metrics={})
    said, go = tmp_path / "round-id", tmp_path / "go"
    orphan = _python(ORPHAN, data.root, said, go)
    try:
        theirs = int(_wait_for(said, orphan))
        assert store.fail_stale_rounds("the app stopped") == 0  # the restart: it lives, so it is not stale
        assert store.round(theirs)["status"] == "running"
        with pytest.raises(RoundAlreadyRunning, match=f"round {theirs}"):
            store.start_round("schedule")
        with pytest.raises(RoundOwnedElsewhere, match="only that process"):
            store.finish_round(theirs, "failed", reason="not mine to fail")
        assert not store.owns_round(theirs)
        go.write_text("1")
        assert orphan.wait(WAIT_S) == 0
    finally:
        if orphan.poll() is None:
            orphan.kill()
    finished = store.round(theirs)
    assert (finished["status"], finished["version"]) == ("succeeded", 1)
    assert store.live_version() == 1 and [r["id"] for r in store.rounds()] == [theirs]
    store.finish_round(store.start_round("schedule"), "skipped")  # its lock went with it


def test_a_round_that_lost_its_row_publishes_nothing(tmp_path):
    data = DataDir(tmp_path / "data")
    store = open_store(data)
    registry = AdapterRegistry(data, store)
    round_id = store.start_round("manual")
    assert store.owns_round(round_id)
    store.fail_stale_rounds("an admin cleared it")  # its own store: allowed, and the lock goes
    staging = write_adapter(registry.staging_dir(), "x")
    with pytest.raises(RoundOwnedElsewhere, match="not published"):
        registry.publish(staging, parent=None, round_id=round_id, metrics={})
    assert store.versions() == [] and staging.exists()  # back in staging, for the round to discard


def test_two_apps_on_one_data_dir_never_overlap_rounds_nor_fail_each_others(tmp_path):
    data = DataDir(tmp_path / "data")
    open_store(data).close()
    apps = [_python(HAMMER, data.root, 150, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [app.communicate(timeout=120) for app in apps]
    assert [app.returncode for app in apps] == [0, 0], [err for _, err in outs]
    ran = [int(out) for out, _ in outs]
    rounds = open_store(data).rounds(limit=None)
    assert len(rounds) == sum(ran) and min(ran) > 0
    assert {r["status"] for r in rounds} == {"succeeded"}  # none failed behind its runner's back
    spans = sorted((r["started_at"], r["finished_at"]) for r in rounds)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False)), "two rounds ran at once"
