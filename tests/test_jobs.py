"""Training rounds (training.round.run_round, python -m training.jobs) and their scheduling, on a tiny
model and real SQLite."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from chatapp.engine import ChatEngine
from storage.paths import DataDir
from storage.registry import RewardModelRegistry
from tests.conftest import add_votes
from training.gate import GateConfig
from training.models import load_model_and_tokenizer
from training.ppo import PPOConfig
from training.rejection_sampling import RejectionConfig
from training.reward_training import RewardConfig
from training.round import RoundConfig, run_round
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
    return sorted(p.name for p in DataDir(data).adapters.iterdir() if p.name.startswith("v"))


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
    with caplog.at_level("INFO", logger="training.round"):
        result = run_round(_config(data, tiny_model_dir, gate=GateConfig(enabled=False)), store, registry)
    assert '"rs": {' in caplog.text and '"n": 2' in caplog.text  # the round's settings are in its log
    assert result["status"] == "succeeded", result
    # ... and in its row: the configuration as run, nested sections included
    config = _config(data, tiny_model_dir, gate=GateConfig(enabled=False))
    assert result["settings"]["rs"]["n"] == config.rs.n and result["settings"]["model"] == config.model
    assert result["settings"]["ppo"]["steps"] == config.ppo.steps
    assert result["version"] == 1 and store.live_version() == 1
    assert store.version(1)["parent"] == 0
    assert _version_dirs(data) == ["v0", "v1"]
    assert (RewardModelRegistry(DataDir(data)).latest() / "reward_model.json").is_file()
    assert not any((DataDir(data).reward_models / ".staging").iterdir())
    assert "rm/accuracy" in result["metrics"] and "objective/kl" in result["metrics"]
    assert result["metrics"]["rs/examples"] > 0  # rejection sampling ran before PPO ...
    # ... and PPO's KL target counts from where it left the policy
    assert result["metrics"]["rs/ppo_kl_target"] == PPOConfig().kl_target + max(0.0, result["metrics"]["rs/kl"])
    # a second round warm-starts the reward model from the first
    second = _config(data, tiny_model_dir, gate=GateConfig(enabled=False))
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
    only_warm = run_round(_config(data, tiny_model_dir, gate=GateConfig(enabled=False), rm_fresh_candidate=False), store, registry)
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
    staging = DataDir(data).adapters / ".staging"
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
    result = run_round(_config(data, tiny_model_dir, gate=GateConfig(enabled=False), ppo=frozen, init_policy=init_policy),
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


def _jobs_argv(data: Path, model_dir, *extra: str) -> list[str]:
    fast = ["--min-votes", "6", "--reward.epochs", "1", "--ppo.steps", "1", "--ppo.rollout-batch-size", "4",
            "--ppo.mini-batch-size", "4", "--ppo.ppo-epochs", "1", "--ppo.max-new-tokens", "6",
            "--ppo.normalize-samples", "4", "--gate.enabled", "false"]
    return ["--data-dir", str(data), "--model", str(model_dir), *fast, *extra]


def test_jobs_refuses_another_base_model_and_a_missing_data_dir(world, tiny_model_dir, tmp_path, capsys):
    from training.jobs import main

    store, _, data = world
    add_votes(store, 12)
    DataDir(data).record_model("org/another-model")
    assert main(_jobs_argv(data, tiny_model_dir)) == 2
    assert "org/another-model" in capsys.readouterr().err
    assert store.rounds() == [] and store.live_version() == 0  # nothing trained, nothing published
    missing = tmp_path / "no-such-dir"
    assert main(_jobs_argv(missing, tiny_model_dir)) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    DataDir(data).model_marker.unlink()
    DataDir(data).record_model(str(tiny_model_dir))  # the data dir's own base trains
    assert main(_jobs_argv(data, tiny_model_dir)) == 0
    assert store.rounds()[0]["status"] == "succeeded" and store.live_version() == 1


def test_the_export_holds_exactly_the_pairs_a_round_trains_on(world, tiny_model_dir, tmp_path):
    import json

    store, registry, data = world
    add_votes(store, 12, choices=("a", "b", "tie", "both_bad"))
    conv = store.new_conversation("same")
    same = store.add_comparison(conv, "same", [{"role": "user", "content": "hi"}], "ok", " ok ", 0, 0, {}, {})
    store.vote(same, "a")  # the same answer twice teaches nothing
    out = tmp_path / "votes.jsonl"
    exported = store.export_jsonl(out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert exported == len(lines) == 9 and sum(line["tie"] for line in lines) == 3
    keys = ("conversation_id", "prompt", "chosen", "rejected", "tie")
    from training.preferences import load_pairs_jsonl

    # read back, the export gives the reward model the same pairs as the store (same held-out split)
    assert [{k: p[k] for k in keys} for p in load_pairs_jsonl(out)] == [{k: p[k] for k in keys} for p in store.vote_pairs()]
    result = run_round(_config(data, tiny_model_dir, min_votes=3, gate=GateConfig(enabled=False)), store, registry)
    assert result["status"] == "succeeded", result
    m = result["metrics"]
    assert result["votes_used"] == exported
    assert m["rm/train_pairs"] + m["rm/heldout_pairs"] == exported and m["rm/ties"] == 3 and m["rm/dropped_pairs"] == 0


def test_a_round_that_fails_after_its_reward_model_leaves_no_staging(world, tiny_model_dir, tmp_path):
    store, registry, data = world
    add_votes(store, 12)
    bad_demos = tmp_path / "demos.jsonl"
    bad_demos.write_text('{"not": "a conversation"}\n')  # PPO-ptx fails to read it, after step 3
    ppo = PPOConfig(steps=1, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6,
                    normalize_samples=4, ptx_coef=0.1)
    result = run_round(_config(data, tiny_model_dir, ppo=ppo, ptx_data=str(bad_demos)), store, registry)
    assert result["status"] == "failed" and "SftDataError" in result["reason"]
    rm_staging = DataDir(data).reward_models / ".staging"
    assert rm_staging.is_dir() and not any(rm_staging.iterdir())  # it was written, then removed
    assert RewardModelRegistry(DataDir(data)).latest() is None and _version_dirs(data) == ["v0"]


def test_the_round_seed_reaches_every_seeded_part():
    from training.flags import dataclass_from_args
    from training.jobs import build_parser

    parse = build_parser().parse_args
    zero, one = (dataclass_from_args(RoundConfig, parse(["--seed", s])) for s in ("0", "1"))
    for part in ("reward", "rs", "ppo", "gate"):
        assert getattr(zero, part).seed != getattr(one, part).seed, part
    assert len({zero.reward.seed, zero.rs.seed, zero.ppo.seed, zero.gate.seed}) == 4  # each part its own
    assert dataclass_from_args(RoundConfig, parse(["--seed", "1"])).ppo.seed == one.ppo.seed  # reproducible
    with pytest.raises(SystemExit):
        parse(["--ppo.seed", "3"])  # one knob: the round's


def test_the_round_seed_changes_the_answers_ppo_samples(world, tiny_model_dir):
    from training.round import improve_policy, starting_policy

    store, registry, data = world
    prompts = [[{"role": "user", "content": f"question number {i}"}] for i in range(4)]
    sampled: dict[int, list[str]] = {}
    for seed in (0, 1, 0):
        config = _config(data, tiny_model_dir, seed=seed, rs=RejectionConfig())
        model, tok = load_model_and_tokenizer(tiny_model_dir)
        policy = starting_policy(model, config, registry, 0)
        answers: list[str] = []

        def reward_fn(batch, batch_answers, answers=answers):
            answers.extend(batch_answers)
            return torch.tensor([float(len(a)) for a in batch_answers])

        improve_policy(policy, tok, reward_fn, prompts, config)
        assert sampled.setdefault(seed, answers) == answers  # the same seed, the same samples
    assert sampled[0] != sampled[1]


def test_the_reward_model_cli_trains_on_a_data_dirs_votes(world, tiny_model_dir, tmp_path, capsys):
    import json

    from training.reward_training import main

    store, _, data = world
    add_votes(store, 9, choices=("a", "tie", "both_bad"))
    assert main(["--model", str(tiny_model_dir), "--data-dir", str(data), "--out", str(tmp_path / "rm"),
                 "--epochs", "1", "--min-votes", "3"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["rm/train_pairs"] + metrics["rm/heldout_pairs"] == len(store.vote_pairs()) == 6
    assert metrics["rm/ties"] == 3
