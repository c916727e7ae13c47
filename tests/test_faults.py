"""Faults in training never reach chat: ``kill -9`` of the training child while it is writing
its adapter → chat keeps answering on the live version, the round is recorded as failed, the
half-written directory is removed and never served (not even after a restart), and the next
round runs and publishes. The app runs in-process on a free port with the tiny model; the
round is a real ``python -m training.jobs`` child."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from app import AppConfig, build_app, launch
from storage.paths import DataDir
from storage.registry import AdapterRegistry, is_complete
from storage.store import open_store
from tests.conftest import add_votes, free_port, served_app
from training.gate import GateConfig
from training.round import RoundConfig
from training.user_gate import UserGateConfig

pytestmark = pytest.mark.slow
WAIT_S = 300  # a deadline against hangs only

# `python -m training.jobs`, except that saving the adapter writes half of its weights file,
# says so, and hangs until killed: the child dies mid-publish.
HALF_WRITE_THEN_HANG = r"""
import sys, time
from pathlib import Path
import training.jobs as jobs
import training.round as round_steps
marker = Path(sys.argv[1])
save = round_steps.save_adapter
def half_save(policy, name, directory):
    save(policy, name, directory)
    for f in Path(directory).glob("*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    marker.write_text(str(directory))
    time.sleep(600)
round_steps.save_adapter = half_save
sys.exit(jobs.main(sys.argv[2:]))
"""


def _last_reply_version(store) -> int:
    return store.db.execute(
        "select policy_version from messages where role = 'assistant' order by id desc limit 1"
    ).fetchone()[0]


@pytest.fixture
def app_config(tiny_model_dir, tmp_path):
    return AppConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
        max_new_tokens=4, round=RoundConfig(min_votes=6, gate=GateConfig(enabled=False)),
        user_gate=UserGateConfig(user_gate=False),
    )  # fmt: skip


def test_kill_9_mid_publish_chat_lives_round_failed_nothing_half_written_served(app_config, tmp_path):
    from gradio_client import Client

    data = Path(app_config.data_dir)
    with served_app(app_config) as (demo, scheduler):
        store = open_store(data)
        add_votes(store, 12, choices=("b", "a"))
        client = Client(f"http://127.0.0.1:{app_config.port}/", verbose=False)
        marker = tmp_path / "half-written"
        round_fn = scheduler.round_fn
        round_fn.command = [sys.executable, "-c", HALF_WRITE_THEN_HANG, str(marker)]
        runner = threading.Thread(target=scheduler.run_now, args=("manual",))
        runner.start()
        for _ in range(WAIT_S * 10):
            if marker.exists() or not runner.is_alive():
                break
            threading.Event().wait(0.1)
        log = data / "logs" / "training.log"
        assert marker.exists(), log.read_text(errors="replace")[-3000:]
        staging = Path(marker.read_text())
        # the child is frozen mid-publish: a half-written adapter sits in staging
        assert is_complete(staging), "the staging dir looks complete to a naive check"
        assert store.running_round() is not None
        # chat answers meanwhile, on the live version
        chat, *_ = client.predict("hello during the round", False, api_name="/send")
        assert chat[-1]["role"] == "assistant" and _last_reply_version(store) == 0

        os.kill(round_fn.pid, signal.SIGKILL)
        runner.join(WAIT_S)
        assert not runner.is_alive()
        result = scheduler.last_result
        assert result["status"] == "failed" and "code -9" in result["reason"], result
        status, rounds, _ = client.predict(api_name="/training_status")
        assert rounds["data"][0][2] == "failed"
        assert not staging.exists(), "the half-written adapter was left in staging"
        assert [v["version"] for v in store.versions()] == [0] and store.live_version() == 0
        assert sorted(p.name for p in (data / "adapters").iterdir() if p.name.startswith("v")) == ["v0"]
        chat, *_ = client.predict("hello after the kill", False, api_name="/send")
        assert chat[-1]["role"] == "assistant" and _last_reply_version(store) == 0

        # the next round runs (the real job this time) and its adapter is served
        round_fn.command = [sys.executable, "-m", "training.jobs"]
        result = scheduler.run_now("manual")
        assert result["status"] == "succeeded", f"{result}\n{log.read_text(errors='replace')[-3000:]}"
        assert store.live_version() == result["version"] == 1
        client.predict("hello after the next round", False, api_name="/send")
        assert _last_reply_version(store) == 1


def test_restart_after_a_crash_cleans_staging_and_fails_the_stale_round(app_config):
    """A crash of the whole app mid-round (round left 'running', staging left on disk): the
    next start marks the round failed, deletes the staging dir and serves the live version."""
    data = Path(app_config.data_dir)
    demo, scheduler = build_app(app_config)
    demo.close()
    scheduler.shutdown()
    store = open_store(data)
    stale = store.start_round("schedule")
    store.release_round_locks()  # the crashed process is gone: the OS released its round lock
    registry = AdapterRegistry(DataDir(data), store)
    staging = registry.staging_dir()
    (staging / "adapter_config.json").write_text("{}")
    (staging / "adapter_model.safetensors").write_bytes(b"\0" * 8)  # garbage weights

    demo, scheduler = build_app(app_config)  # the restart
    try:
        assert store.round(stale)["status"] == "failed"
        assert not staging.exists()
        launch(demo, app_config, block=False)
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{app_config.port}/", verbose=False)
        chat, *_ = client.predict("hello after the restart", False, api_name="/send")
        assert chat[-1]["role"] == "assistant" and _last_reply_version(store) == 0
    finally:
        demo.close()
        scheduler.shutdown()


def test_sigterm_shuts_down_like_ctrl_c(tiny_model_dir, tmp_path):
    # `kill PID` (systemd, docker stop): the server closes, the scheduler is shut down, the store
    # is closed and the process exits 0 instead of dying on the signal mid-whatever
    import subprocess
    import time
    import urllib.request

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data"),
         "--port", str(port), "--max-new-tokens", "4"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    address = f"RLHF chat on http://127.0.0.1:{port}"
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while address not in lines:  # printed once the UI answers
            assert proc.poll() is None, "\n".join(lines)
            assert time.monotonic() < deadline, "app never came up"
            time.sleep(0.2)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        reader.join(10)
        output = "\n".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, output
    assert "Traceback" not in output, output
    # a quiet console: the address once the UI is up, at most a few lines before it, no library noise
    assert lines.count(address) == 1 and lines.index(address) <= 3, output
    for noise in ("Running on local URL", "share=True", "httpx", "apscheduler", "Warning", "Loading weights"):
        assert noise not in output, (noise, output)
    # chat.db alone holds the data (the WAL was folded in on shutdown), created private
    import shutil
    import sqlite3
    import stat

    data = DataDir(tmp_path / "data")
    assert stat.S_IMODE(data.root.stat().st_mode) == 0o700 and stat.S_IMODE(data.db.stat().st_mode) == 0o600
    alone = tmp_path / "alone.db"
    shutil.copy(data.db, alone)
    with sqlite3.connect(alone) as db:
        assert db.execute("SELECT version FROM policy_versions").fetchall() == [(0,)]
