"""One copy of the base weights per round: the policy, the reference, the reward models and the
value head are adapters and heads on one peft model, and switching between them changes nothing
of the others (tiny model, real SQLite, the round's own step functions)."""

from __future__ import annotations

import pytest
import torch

from storage.registry import RewardModelRegistry
from tests.conftest import add_votes
from tests.test_jobs import _config
from training.models import requires_grad_flags, using_adapter
from training.ppo import PPOConfig, ppo_train
from training.reward_training import make_reward_fn
from training.round import load_inputs, load_model, reward_model_step, run_round, starting_policy

pytestmark = pytest.mark.usefixtures("single_thread")


def _base_storage(model) -> list[int]:
    """data_ptr of every base (non-LoRA) weight, sorted: the same list is the same storage."""
    return sorted(p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n)


def _adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n}


def _count_loads(monkeypatch) -> list[str]:
    """Spy on the one call that reads base weights from disk: the names it loaded."""
    from transformers import AutoModelForCausalLM

    calls: list[str] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, name, *args, **kwargs):
        calls.append(str(name))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    return calls


def test_a_round_with_warm_and_fresh_reward_models_loads_the_base_once(world, tiny_model_dir, monkeypatch):
    store, registry, data = world
    add_votes(store, 12)
    config = _config(data, tiny_model_dir)
    assert run_round(config, store, registry)["status"] in ("succeeded", "rejected")  # a reward model in use
    add_votes(store, 6)
    calls = _count_loads(monkeypatch)
    second = run_round(config, store, registry)
    assert second["status"] in ("succeeded", "rejected"), second
    assert "rm/warm_accuracy" in second["metrics"] and "rm/fresh_accuracy" in second["metrics"]  # both trained
    assert calls == [str(tiny_model_dir)]  # one base for policy, reference, 2 reward models, value head, gate


def test_the_reward_models_and_the_policy_share_base_storage_and_keep_their_own_weights(world, tiny_model_dir):
    store, registry, data = world
    add_votes(store, 12)
    config = _config(data, tiny_model_dir)
    model, tok, _, inputs = load_model(config, load_inputs(config, store))
    base = _base_storage(model)
    policy = starting_policy(model, config, registry, inputs.live)
    reward_models = RewardModelRegistry(registry.data_dir)
    first = reward_model_step(config, policy, tok, inputs.pairs, reward_models)
    reward_models.publish(first.staging)
    step = reward_model_step(config, policy, tok, inputs.pairs, reward_models)  # warm + fresh candidate
    assert step.rm.backbone is policy and _base_storage(policy) == base  # no copy anywhere
    assert len({first.rm.adapter, step.rm.adapter}) == 2  # a second step beside the first: its own names
    first.rm.release()
    assert set(policy.peft_config) == {"policy", step.rm.adapter}  # the losing candidate was freed
    assert policy.active_adapter == "policy"

    # a policy that differs from the base: its adapter must not leak into the reward model's score
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.add_(0.5 * torch.randn_like(p))
    prompts = [[{"role": "user", "content": f"question number {i}"}] for i in range(4)]
    answers = ["ok 1", "a much longer answer", "tac.", "it is 42."]
    reward_fn = make_reward_fn(step.rm, tok)
    flags = requires_grad_flags(policy)
    policy_weights = _adapter_weights(policy, "policy")
    scores = reward_fn(prompts, answers)
    assert policy.active_adapter == "policy" and requires_grad_flags(policy) == flags
    assert all(torch.equal(w, _adapter_weights(policy, "policy")[n]) for n, w in policy_weights.items())

    # the same reward model on a copy of its own (loaded from disk) scores the same
    from training.reward_model import RewardModel

    saved = data / "rm-copy"
    step.rm.save(saved)
    alone = RewardModel.load(str(tiny_model_dir), saved)
    assert torch.allclose(make_reward_fn(alone, tok)(prompts, answers), scores, atol=1e-5)

    # PPO on the policy moves the policy adapter only: the reward model's weights and scores stay
    rm_weights = _adapter_weights(policy, step.rm.adapter)
    ppo_train(policy, tok, reward_fn, prompts, PPOConfig(steps=1, rollout_batch_size=4, mini_batch_size=2,
                                                         max_new_tokens=6, normalize_reward=False))
    assert any(not torch.equal(w, _adapter_weights(policy, "policy")[n]) for n, w in policy_weights.items())
    assert all(torch.equal(w, _adapter_weights(policy, step.rm.adapter)[n]) for n, w in rm_weights.items())
    assert torch.allclose(reward_fn(prompts, answers), scores, atol=1e-6)
    assert requires_grad_flags(policy) == flags


def test_using_adapter_restores_the_active_adapter_and_every_flag(world, tiny_model_dir):
    from training.models import add_lora, load_model_and_tokenizer

    _, registry, _ = world
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    peft = add_lora(model, adapter_name="policy")
    add_lora(peft, adapter_name="reward")
    for trainable in ("reward", "policy", None):  # one of them trainable, or both frozen (serving, gate)
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.requires_grad_(trainable is not None and f".{trainable}." in name)
        flags = requires_grad_flags(peft)
        with using_adapter(peft, "reward"):
            assert peft.active_adapter == "reward"
        assert peft.active_adapter == "policy" and requires_grad_flags(peft) == flags, trainable


def test_the_serving_engine_keeps_one_base_for_every_version_it_serves(tiny_model_dir, tmp_path):
    from chatapp.engine import ChatEngine
    from storage.paths import DataDir
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from tests.test_engine import greedy, msgs, publish_changed
    from training.models import load_model_and_tokenizer

    store = open_store(tmp_path / "data")
    registry = AdapterRegistry(DataDir(tmp_path / "data"), store)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    base = _base_storage(model)
    engine = ChatEngine(model, tok, registry)
    for shift in (0.5, -0.5):
        publish_changed(engine, tiny_model_dir, shift)
    replies = [engine.reply(msgs("hello there"), greedy(6), version=v) for v in (0, 1, 2)]
    assert [r.version for r in replies] == [0, 1, 2]
    assert sorted(engine._loaded) == [0, 1, 2] and _base_storage(engine.model) == base
    b_weights = [next(p for n, p in engine.model.named_parameters() if "lora_B" in n and f".v{v}." in n) for v in (0, 1, 2)]
    assert not torch.equal(b_weights[1], b_weights[2]) and not torch.equal(b_weights[0], b_weights[1])  # 3 policies
