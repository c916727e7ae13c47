"""A round's progress (stage, i/N, ETA) in its database row and the log, and its time budget
(``--max-minutes``): PPO ends at an iteration boundary and what was trained is gated and
published."""

from __future__ import annotations

import pytest

from tests.conftest import add_votes
from tests.test_jobs import _config
from training.gate import GateConfig
from training.ppo import PPOConfig
from training.progress import RoundProgress
from training.round import run_round

pytestmark = pytest.mark.usefixtures("single_thread")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_reports_stage_iteration_and_eta_and_stops_before_the_budget(store, caplog):
    clock = Clock()
    round_id = store.start_round("manual")
    progress = RoundProgress(store, round_id, max_minutes=1.0, clock=clock)
    progress.stage("ppo", total=10)
    assert store.round(round_id)["progress"]["stage"] == "ppo"
    clock.now += 25  # 25 s per iteration: the second ends at 50 s, a third would end at 75 s > 60 s
    with caplog.at_level("INFO", logger="training.progress"):
        assert progress.ppo_iteration(1, 10) is False
    assert "ppo 1/10, ETA 3m45s" in caplog.text
    clock.now += 25
    assert progress.ppo_iteration(2, 10) is True and progress.stopped_early
    row = store.round(round_id)["progress"]
    assert (row["stage"], row["done"], row["total"], row["eta_s"]) == ("ppo", 2, 10, 200.0)
    from chatapp.training_tab import rounds_table

    assert rounds_table(store)[0][3] == "ppo 2/10, ETA 3m20s"  # the Training tab's running round
    no_budget = RoundProgress(None, None, clock=clock)
    no_budget.stage("ppo", total=3)
    clock.now += 10_000
    assert no_budget.ppo_iteration(1, 3) is False  # no budget: never stops
    with pytest.raises(ValueError, match="max_minutes"):
        RoundProgress(store, round_id, max_minutes=-1)


def test_a_finished_round_is_never_rewritten_by_a_late_report(store):
    round_id = store.start_round("manual")
    store.finish_round(round_id, "skipped", reason="too few votes")
    assert store.set_round_progress(round_id, "ppo", 3, 10) is False
    assert store.round(round_id)["progress"] is None


def test_a_round_over_its_budget_ends_ppo_at_an_iteration_and_publishes_it(world, tiny_model_dir):
    store, registry, data = world
    add_votes(store, 12)
    config = _config(data, tiny_model_dir, max_minutes=1e-6, gate=GateConfig(enabled=False),
                     ppo=PPOConfig(steps=4, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1,
                                   max_new_tokens=6, normalize_samples=4))
    result = run_round(config, store, registry)
    assert result["status"] == "succeeded", result
    metrics = result["metrics"]
    assert metrics["ppo/iterations"] == 1.0 and metrics["ppo/stopped_early"] == 1.0  # one of 4, then stopped
    assert metrics["ppo/samples"] == 4.0
    assert store.live_version() == result["version"] == 1
    assert result["progress"]["stage"] == "publish"
    unlimited = run_round(_config(data, tiny_model_dir, gate=GateConfig(enabled=False),
                                  ppo=PPOConfig(steps=2, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1,
                                                max_new_tokens=6, normalize_samples=4)), store, registry)
    assert unlimited["metrics"]["ppo/iterations"] == 2.0 and unlimited["metrics"]["ppo/stopped_early"] == 0.0


def test_progress_fraction_is_the_share_of_ppo_done():
    from training.progress import STAGES, progress_fraction

    assert progress_fraction({"stage": "ppo", "done": 3, "total": 12}) == 0.25
    assert progress_fraction({"stage": "ppo", "done": 12, "total": 12}) == 1.0
    assert progress_fraction({"stage": "ppo", "done": 0, "total": None}) == 0.0  # PPO starts
    assert progress_fraction({"stage": "ppo", "done": 15, "total": 12}) == 1.0  # clamped
    before, after = STAGES[:STAGES.index("ppo")], STAGES[STAGES.index("ppo") + 1:]
    assert set(before) == {"loading", "reward model", "rejection sampling"} and set(after) == {"gate", "publish"}
    assert [progress_fraction({"stage": s, "done": 0, "total": None}) for s in before] == [0.0] * len(before)
    assert [progress_fraction({"stage": s, "done": 0, "total": None}) for s in after] == [1.0] * len(after)
    assert progress_fraction(None) is None and progress_fraction({}) is None
    assert progress_fraction({"stage": "something else", "done": 1, "total": 2}) is None


def test_the_running_rounds_row_carries_stage_done_total_eta_and_fraction(store):
    clock = Clock()
    round_id = store.start_round("manual")
    progress = RoundProgress(store, round_id, clock=clock)
    progress.stage("reward model")
    assert store.round(round_id)["progress"]["fraction"] == 0.0
    progress.stage("ppo", total=4)
    progress.ppo_iteration(0, 4)
    clock.now += 10
    progress.ppo_iteration(1, 4)
    row = store.round(round_id)["progress"]
    assert (row["stage"], row["done"], row["total"], row["eta_s"], row["fraction"]) == ("ppo", 1, 4, 30.0, 0.25)
    progress.stage("gate")
    assert store.round(round_id)["progress"]["fraction"] == 1.0
    with pytest.raises(ValueError, match="fraction"):
        store.set_round_progress(round_id, "ppo", 5, 4, fraction=1.25)


def test_a_bar_follows_ppo_iterations_with_the_stage_as_its_description(caplog):
    import io

    out = io.StringIO()
    progress = RoundProgress(None, 7, clock=Clock(), bar=True, bar_file=out)
    with caplog.at_level("INFO", logger="training.progress"):
        progress.stage("reward model")
        assert progress.bar is None  # a stage that counts no steps: the log line only
        progress.stage("ppo", total=4)
        progress.ppo_iteration(0, 4)
        progress.ppo_iteration(1, 4)
        progress.ppo_iteration(2, 4)
        bar = progress.bar
        assert bar is not None and bar.desc.startswith("ppo") and (bar.n, bar.total) == (2, 4)
        progress.stage("gate")
    assert progress.bar is None
    assert "ppo:  50%" in out.getvalue() and "2/4" in out.getvalue()
    # the log keeps one line per report: 2 stages + 3 PPO reports + the gate
    lines = [r.getMessage() for r in caplog.records if r.name == "training.progress"]
    assert len(lines) == 6 and sum("ppo 2/4" in line for line in lines) == 1
    plain = RoundProgress(None, 7, clock=Clock())
    plain.stage("ppo", total=4)
    assert plain.bar is None  # off unless asked for


def test_the_bar_is_wanted_only_on_a_terminal(tmp_path):
    import io
    import os
    import pty

    from training.progress import want_bar

    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as terminal, open(tmp_path / "training.log", "a") as log_file:
            assert want_bar(terminal) is True
            assert want_bar(log_file) is False  # the app's child: stderr is the training log
            assert want_bar(io.StringIO()) is False
    finally:
        os.close(master)
        os.close(slave)


def _jobs_command(data, tiny_model_dir) -> list[str]:
    import sys

    from tests.test_jobs import _jobs_argv

    return [sys.executable, "-m", "training.jobs",
            *_jobs_argv(data, tiny_model_dir, "--ppo.steps", "2", "--threads", "1")]


@pytest.mark.slow
def test_the_command_line_shows_a_bar_on_a_terminal_and_keeps_its_log_lines(world, tiny_model_dir):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios
    from pathlib import Path

    from storage.paths import DataDir

    store, _, data = world
    add_votes(store, 12)
    DataDir(data).record_model(str(tiny_model_dir))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 wide
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.Popen(_jobs_command(data, tiny_model_dir), stdout=slave, stderr=slave, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    round_id = store.rounds()[0]["id"]
    assert store.rounds()[0]["status"] == "succeeded"
    assert "ppo: 100%" in text and "2/2" in text  # the bar, described by its stage
    lines = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]  # what a terminal shows of each line
    for report in ("ppo 1/2, ETA", "ppo 2/2, ETA"):  # ... and the log's line per report, once each, whole
        shown = [line for line in lines if f"INFO round {round_id}: {report}" in line]
        assert len(shown) == 1 and shown[0].startswith("20"), (report, text[-3000:])  # a timestamp, no bar before it


@pytest.mark.slow
def test_the_apps_child_round_logs_lines_and_no_bar(world, tiny_model_dir):
    from storage.paths import DataDir
    from tests.test_jobs import _jobs_argv
    from training.scheduler import SubprocessRound

    store, _, data = world
    add_votes(store, 12)
    DataDir(data).record_model(str(tiny_model_dir))
    child = SubprocessRound(_jobs_argv(data, tiny_model_dir, "--ppo.steps", "2", "--threads", "1"), DataDir(data), store)
    result = child("manual")
    log = DataDir(data).training_log.read_text(errors="replace")
    assert result["status"] == "succeeded", log[-3000:]
    assert f"round {result['id']}: ppo 2/2, ETA" in log
    assert "%|" not in log and "\r" not in log  # no tqdm bar in the training log
