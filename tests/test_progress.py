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
    from chatapp.ui import rounds_table

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
