"""Rejection-sampling fine-tuning on a tiny real model: the kept answer is each prompt's best
of n, its example holds exactly the sampled tokens, answers cut at the limit are left out, and
fine-tuning moves only the active adapter towards the rewarded answers."""

from __future__ import annotations

import pytest
import torch

from tests.test_ppo import PROMPTS as PPO_PROMPTS
from tests.test_ppo import e_reward, make_policy  # the tiny base + a fresh adapter; the toy reward
from training.chat_format import end_of_turn_ids
from training.models import LoraSettings, load_model_and_tokenizer
from training.rejection_sampling import (
    RejectionConfig,
    best_of_n,
    measure_kl,
    rejection_sampling_finetune,
)
from training.rollout import generate_rollouts, reference_model
from training.seeds import derive_seed
from training.sft import IGNORE

PROMPTS = PPO_PROMPTS[:6]  # six single-turn prompts


pytestmark = pytest.mark.usefixtures("single_thread")


def test_best_of_n_keeps_each_prompts_best_sampled_tokens(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir, sharpen=10.0)
    eos = end_of_turn_ids(policy, tok)
    config = RejectionConfig(n=4, max_new_tokens=12, rollout_batch_size=4, only_ended=False, seed=3)
    picked = best_of_n(policy, tok, e_reward, PROMPTS, config)
    assert picked.scores.shape == (4, len(PROMPTS)) and len(picked.answers) == 4
    assert all(k is not None for k in picked.chosen) and len(picked.examples) == len(PROMPTS)
    for p, k in enumerate(picked.chosen):
        assert picked.scores[k, p] == picked.scores[:, p].max()
        # the same answer again, sampled on its own with the seed best_of_n gave it
        start = p - p % config.rollout_batch_size  # the chunk of prompts p was sampled in
        seed = derive_seed(config.seed, "rs/sample", k, start) + p - start  # its row: the chunk's seed + row
        ro = generate_rollouts(policy, tok, [PROMPTS[p]], config.max_new_tokens, eos, seed=seed)
        assert ro.answers[0] == picked.answers[k][p]
        ids, labels = picked.examples[p]
        prompt_ids = ro.query_ids[0][ro.query_mask[0].bool()].tolist()
        answer_ids = ro.response_ids[0][ro.response_mask[0].bool()].tolist()
        assert ids == prompt_ids + answer_ids
        assert labels == [IGNORE] * len(prompt_ids) + answer_ids  # loss on the answer only


def test_answers_cut_at_the_limit_are_left_out(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir, sharpen=10.0)
    config = RejectionConfig(n=3, max_new_tokens=3, rollout_batch_size=8, seed=1)
    picked = best_of_n(policy, tok, e_reward, PROMPTS, config)
    assert not picked.ended.all()  # a random tiny model rarely ends within 3 tokens
    for p, k in enumerate(picked.chosen):
        if k is None:
            assert not picked.ended[:, p].any()
        else:  # the best among the answers that ended, even if a cut one scored higher
            assert picked.ended[k, p]
            assert picked.scores[k, p] == picked.scores[picked.ended[:, p], p].max()
    assert len(picked.examples) == sum(k is not None for k in picked.chosen)


def test_finetune_moves_only_the_active_adapter_towards_the_reward(tiny_model_dir):
    policy, tok = make_policy(tiny_model_dir, sharpen=10.0)
    policy.add_adapter("other", LoraSettings(r=4).peft_config())  # not active: must not change
    policy.set_adapter("default")
    policy.train()
    eos = end_of_turn_ids(policy, tok)
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}

    def mean_reward():
        with torch.no_grad():
            ro = generate_rollouts(policy, tok, PROMPTS * 8, 12, eos, seed=999)
        return e_reward(None, ro.answers).mean().item()

    start = mean_reward()
    config = RejectionConfig(n=8, steps=30, batch_size=6, lr=3e-2, max_new_tokens=12, only_ended=False, seed=3,
                             kl_prompts=12)
    assert measure_kl(policy, tok, PROMPTS, config) == 0.0  # fresh adapter (B = 0): the reference itself
    metrics = rejection_sampling_finetune(policy, tok, e_reward, PROMPTS, config)
    assert mean_reward() > start + 0.1
    assert metrics["rs/kl"] > 0.05 and metrics["rs/kl"] == measure_kl(policy, tok, PROMPTS, config)
    assert metrics["rs/score_best"] > metrics["rs/score_mean"]
    assert metrics["rs/nll_last"] < metrics["rs/nll_first"]
    assert metrics["rs/examples"] == len(PROMPTS)
    assert policy.training  # mode restored
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    changed = {n for n, p in policy.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n and ".default." in n for n in changed)
    with reference_model(policy), torch.no_grad():  # the reference is still the base
        ro = generate_rollouts(policy, tok, PROMPTS, 12, eos, seed=5)
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(10.0)
        assert generate_rollouts(base, tok, PROMPTS, 12, eos, seed=5).answers == ro.answers


def test_rejection_config_errors(tiny_model_dir):
    with pytest.raises(ValueError, match=r"RejectionConfig.n \(--rs.n\) must be a finite number > 0"):
        RejectionConfig(n=0)
    with pytest.raises(ValueError, match=r"--rs.lr"):
        RejectionConfig(lr=float("inf"))
    assert not RejectionConfig().enabled and RejectionConfig(n=2).enabled  # off by default
    policy, tok = make_policy(tiny_model_dir, sharpen=10.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        best_of_n(policy, tok, e_reward, [], RejectionConfig())
    with pytest.raises(ValueError, match="2 scores for 6 answers"):
        best_of_n(policy, tok, lambda p, a: torch.zeros(2), PROMPTS, RejectionConfig(n=2, max_new_tokens=4))
