"""Training rounds (training.jobs.run_round) and their scheduling, on a tiny model and real SQLite."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from chatapp.engine import ChatEngine
from tests.conftest import add_votes
from training.gate import GateConfig
from training.jobs import ADAPTERS_DIRNAME, RoundConfig, preference_pairs, run_round
from training.models import load_model_and_tokenizer
from training.ppo import PPOConfig
from training.rejection import RejectionConfig
from training.reward import RewardConfig
from training.scheduler import TrainingScheduler


def _config(data: Path, model_dir, **overrides) -> RoundConfig:
    fast = dict(
        data_dir=str(data),
        model=str(model_dir),
        min_votes=6,
        reward=RewardConfig(epochs=1, batch_size=4),
        rs=RejectionConfig(n=2, steps=1, batch_size=2, max_new_tokens=6, only_ended=False),
        ppo=PPOConfig(steps=1, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6, normalize_samples=4),
        gate=GateConfig(n_prompts=4, max_new_tokens=6),
    )
    fast.update(overrides)
    return RoundConfig(**fast)


def _version_dirs(data: Path) -> list[str]:
    return sorted(p.name for p in (data / ADAPTERS_DIRNAME).iterdir() if p.name.startswith("v"))


def test_preference_pairs_keep_ties_and_drop_both_bad(world):
    store, _, _ = world
    add_votes(store, 8, choices=("a", "b", "tie", "both_bad"))
    pairs = preference_pairs(store)
    assert len(pairs) == 6
    assert sum(p["tie"] for p in pairs) == 2
    for p in pairs:
        if not p["tie"]:
            assert p["chosen"] != p["rejected"]
    b_votes = [c for c in store.voted_comparisons() if c["choice"] == "b"]
    assert any(p["chosen"] == b_votes[0]["answer_b"] for p in pairs)


def test_too_few_votes_skips_with_reason(world, tiny_model_dir):
    store, registry, data = world
    add_votes(store, 3)
    result = run_round(_config(data, tiny_model_dir), store, registry)
    assert result["status"] == "skipped"
    assert "too few votes" in result["reason"] and "3" in result["reason"]
    assert store.live_version() == 0 and _version_dirs(data) == ["v0"]


def test_round_publishes_new_live_version_without_gate(world, tiny_model_dir, caplog):
    store, registry, data = world
    add_votes(store, 12)
    with caplog.at_level("INFO", logger="training.jobs"):
        result = run_round(_config(data, tiny_model_dir, gate_enabled=False), store, registry)
    assert '"rs": {' in caplog.text and '"n": 2' in caplog.text  # the round's settings are in its log
    assert result["status"] == "succeeded", result
    # ... and in its row: the configuration as run, nested sections included
    config = _config(data, tiny_model_dir, gate_enabled=False)
    assert result["settings"]["rs"]["n"] == config.rs.n and result["settings"]["model"] == config.model
    assert result["settings"]["ppo"]["steps"] == config.ppo.steps
    assert result["version"] == 1 and store.live_version() == 1
    assert store.version(1)["parent"] == 0
    assert _version_dirs(data) == ["v0", "v1"]
    assert (data / "reward" / "latest" / "reward_model.json").is_file()
    assert "rm/accuracy" in result["metrics"] and "objective/kl" in result["metrics"]
    assert result["metrics"]["rs/examples"] > 0  # rejection sampling ran before PPO ...
    # ... and PPO's KL target counts from where it left the policy
    assert result["metrics"]["rs/ppo_kl_target"] == PPOConfig().kl_target + max(0.0, result["metrics"]["rs/kl"])
    # a second round warm-starts the reward model from the first
    second = _config(data, tiny_model_dir, gate_enabled=False)
    again = run_round(second, store, registry)
    assert again["status"] == "succeeded", again
    # β starts where the first round left it; the caller's config is not changed
    assert result["metrics"]["objective/kl_coef_start"] == PPOConfig().init_kl_coef
    assert again["metrics"]["objective/kl_coef_start"] == result["metrics"]["objective/kl_coef"] != PPOConfig().init_kl_coef
    assert second.ppo.init_kl_coef == PPOConfig().init_kl_coef
    assert again["version"] == 2 and store.version(2)["parent"] == 1
    assert "rm/prev_accuracy" in again["metrics"] and again["metrics"]["rm/replaced"] in (0.0, 1.0)
    # ... and trains one from the base too: the round's candidate is the more accurate of the two
    m = again["metrics"]
    warm, fresh = m["rm/warm_accuracy"], m["rm/fresh_accuracy"]
    if fresh is not None and warm is not None and fresh > warm:
        assert m["rm/from_scratch"] == 1.0 and m["rm/accuracy"] == fresh
    else:
        assert m["rm/from_scratch"] == 0.0 and (m["rm/accuracy"] == warm or warm is None)
    only_warm = run_round(_config(data, tiny_model_dir, gate_enabled=False, rm_fresh_candidate=False), store, registry)
    assert only_warm["status"] == "succeeded" and "rm/from_scratch" not in only_warm["metrics"]


def test_gate_rejection_is_recorded_and_live_keeps_serving(world, tiny_model_dir):
    store, registry, data = world
    add_votes(store, 12)
    strict = GateConfig(n_prompts=4, max_new_tokens=6, min_win_rate=1.0)  # unreachable bar
    result = run_round(_config(data, tiny_model_dir, gate=strict), store, registry)
    assert result["status"] == "rejected", result
    assert "win rate" in result["reason"]
    assert store.live_version() == 0
    assert store.version(result["version"])["status"] == "rejected"
    with pytest.raises(ValueError):
        store.set_live(result["version"])


def test_failed_round_is_recorded_and_publishes_nothing(world, tmp_path):
    store, registry, data = world
    add_votes(store, 12)
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    result = run_round(_config(data, broken), store, registry)
    assert result["status"] == "failed" and result["reason"]
    assert store.live_version() == 0 and _version_dirs(data) == ["v0"]
    staging = data / ADAPTERS_DIRNAME / ".staging"
    assert not staging.exists() or not any(staging.iterdir())
    # the next round runs
    assert store.running_round() is None


def test_scheduler_never_runs_two_rounds_at_once(world):
    store, _, _ = world
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_round(trigger):
        calls.append(trigger)
        started.set()
        release.wait(10)
        return {"status": "succeeded"}

    scheduler = TrainingScheduler(slow_round, store, train_every_min=60, min_new_votes=1)
    first = threading.Thread(target=scheduler.run_now, args=("manual",))
    first.start()
    assert started.wait(10)
    assert scheduler.busy
    assert scheduler.run_now("manual") is None  # refused, not queued
    assert "already running" in scheduler.request_round()
    release.set()
    first.join(10)
    assert calls == ["manual"] and not scheduler.busy


def test_scheduled_tick_waits_for_enough_new_votes(world):
    store, _, _ = world
    calls = []
    scheduler = TrainingScheduler(lambda t: calls.append(t) or {"status": "succeeded"}, store, 60, min_new_votes=5)
    add_votes(store, 3)
    assert scheduler.scheduled_tick() is None and calls == []
    add_votes(store, 3)
    scheduler.scheduled_tick()
    assert calls == ["schedule"]


def test_a_raising_round_is_logged_and_the_scheduler_lives_on(world, caplog):
    store, _, _ = world

    def boom(trigger):
        raise RuntimeError("out of memory (simulated)")

    scheduler = TrainingScheduler(boom, store, 60, min_new_votes=0)
    with caplog.at_level("ERROR"):
        assert scheduler.run_now("manual") is None
    assert "out of memory" in caplog.text and "Traceback" in caplog.text
    assert not scheduler.busy


@pytest.mark.parametrize("init_policy", ["reference", "live"])
def test_ppo_starts_from_reference_or_live_adapter(world, tiny_model_dir, init_policy):
    # live = v1, every LoRA B shifted to 0.5; a round whose PPO barely moves (lr 1e-12) leaves
    # its candidate where it started: B ≈ 0 from the reference, B ≈ 0.5 from the live adapter
    from safetensors.torch import load_file

    from tests.test_engine import publish_changed

    store, registry, data = world
    engine = ChatEngine(*load_model_and_tokenizer(tiny_model_dir), registry)
    assert publish_changed(engine, tiny_model_dir, shift=0.5) == 1 and store.live_version() == 1
    add_votes(store, 12)
    frozen = PPOConfig(steps=1, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6,
                       normalize_samples=4, lr=1e-12)
    result = run_round(_config(data, tiny_model_dir, gate_enabled=False, ppo=frozen, init_policy=init_policy),
                       store, registry)
    assert result["status"] == "succeeded", result
    weights = load_file(str(registry.path(result["version"]) / "adapter_model.safetensors"))
    b = [t for name, t in weights.items() if "lora_B" in name]
    assert b
    expected = 0.0 if init_policy == "reference" else 0.5
    assert all(abs(float(t.mean()) - expected) < 1e-3 for t in b), [float(t.mean()) for t in b]
    assert store.version(result["version"])["parent"] == 1  # it replaces the live version


def test_init_policy_is_checked():
    with pytest.raises(ValueError, match="init_policy"):
        RoundConfig(init_policy="somewhere")
