"""Promotion gate: rejects a losing, drifting, collapsed or over-long candidate."""

from __future__ import annotations

import pytest
import torch

from training.gate import GateConfig, gate_decision, run_gate
from training.models import LoraSettings, add_lora, load_model_and_tokenizer

CFG = GateConfig(min_win_rate=0.55, max_kl=5.0, min_distinct=0.5, max_length_ratio=1.5,
                 length_slack_tokens=2.0)


def _decide(**over):
    n = 8
    args = dict(
        candidate_scores=torch.arange(n, dtype=torch.float32) + 1.0,  # beats live on every prompt
        live_scores=torch.arange(n, dtype=torch.float32),
        candidate_answers=[f"answer {i}" for i in range(n)],
        candidate_kl=torch.full((n,), 1.0),
        candidate_lengths=torch.full((n,), 10.0),
        live_lengths=torch.full((n,), 10.0),
        config=CFG,
    )
    args.update(over)
    return gate_decision(**args)


def test_good_candidate_passes():
    result = _decide()
    assert result.passed and result.reason == ""
    assert result.metrics["gate/win_rate"] == 1.0 and result.metrics["gate/distinct"] == 1.0


def test_win_rate_counts_ties_half():
    # 2 wins, 2 ties, 4 losses: (2 + 1) / 8
    cand = torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0])
    result = _decide(candidate_scores=cand, live_scores=torch.zeros(8))
    assert result.metrics["gate/win_rate"] == pytest.approx(3 / 8)
    assert not result.passed and "win rate" in result.reason


def test_default_bar_promotes_a_candidate_judged_no_worse_than_live():
    default = GateConfig()
    ties = _decide(candidate_scores=torch.zeros(8), live_scores=torch.zeros(8), config=default)
    assert ties.metrics["gate/win_rate"] == 0.5 and ties.passed
    one_loss = torch.tensor([0.0] * 7 + [-1.0])  # 7 ties, 1 loss: 3.5 / 8
    worse = _decide(candidate_scores=one_loss, live_scores=torch.zeros(8), config=default)
    assert not worse.passed and "win rate" in worse.reason


def test_collapsed_candidate_rejected():
    result = _decide(candidate_answers=["the same"] * 7 + ["other"])
    assert not result.passed and "collapsed" in result.reason


def test_over_long_candidate_rejected():
    result = _decide(candidate_lengths=torch.full((8,), 18.0))  # limit 1.5·10 + 2 = 17
    assert not result.passed and "grew" in result.reason
    assert _decide(candidate_lengths=torch.full((8,), 16.0)).passed


def test_drifting_candidate_rejected():
    result = _decide(candidate_kl=torch.full((8,), 6.0))
    assert not result.passed and "KL" in result.reason


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="same N"):
        _decide(live_scores=torch.zeros(3))


def test_run_gate_on_two_adapters(tiny_model_dir, single_thread):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    policy = add_lora(model, LoraSettings(r=4), adapter_name="live")
    policy.add_adapter("candidate", LoraSettings(r=4).peft_config())
    gen = torch.Generator().manual_seed(0)  # not the global RNG: other tests must not change this candidate
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_A.candidate" in name or "lora_B.candidate" in name:  # both: A's init is global-RNG
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)  # far enough that KL > 0 beats k1 noise
    policy.set_adapter("live")
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    # reward = answer length in characters: a long-winded candidate "wins" but the gate sees it
    result = run_gate(policy, tok, lambda p, a: torch.tensor([float(len(x)) for x in a]), prompts,
                      GateConfig(n_prompts=24, max_new_tokens=6, min_win_rate=0.0, max_kl=1e9),
                      candidate_adapter="candidate", live_adapter="live")
    assert result.metrics["gate/n"] == 24 and result.metrics["gate/kl"] > 0  # k1 is noisy: 24 answers, not 6
    assert result.passed, result.reason
    assert policy.active_adapter == "live"
    assert flags == {n: p.requires_grad for n, p in policy.named_parameters()}
    strict = run_gate(policy, tok, lambda p, a: torch.zeros(len(a)), prompts,
                      GateConfig(n_prompts=24, max_new_tokens=6, max_kl=1e-6, min_win_rate=0.55),  # all ties: 0.5
                      candidate_adapter="candidate")
    assert not strict.passed and "KL" in strict.reason and "win rate" in strict.reason
    with pytest.raises(ValueError, match="no adapter"):
        run_gate(policy, tok, lambda p, a: torch.zeros(len(a)), prompts, GateConfig(), "nope")


def test_rm_accuracy_check_needs_confidence_not_luck():
    from training.gate import rm_accuracy_check

    config = GateConfig()  # better than chance, lower bound at z = 1
    # the same 0.62 accuracy: over 9 held-out votes it could be chance, over 60 it is not
    assert "lower bound" in rm_accuracy_check(0.62, 9, config)
    assert rm_accuracy_check(0.62, 60, config) == ""
    assert "0.45 over 40" in rm_accuracy_check(0.45, 40, config)  # worse than chance
    assert rm_accuracy_check(float("nan"), 0, config) == ""  # no held-out votes: not checked
    assert rm_accuracy_check(None, 0, config) == ""
    strict = GateConfig(min_rm_accuracy=0.7, rm_accuracy_z=0.0)  # a plain accuracy bar
    assert rm_accuracy_check(0.72, 9, strict) == "" and rm_accuracy_check(0.68, 900, strict) != ""
    with pytest.raises(ValueError, match="rm_accuracy_z"):
        GateConfig(rm_accuracy_z=-1.0)


def test_wilson_bound_on_one_of_one_rejects_the_reward_model():
    from training.gate import rm_accuracy_check, wilson_interval

    config = GateConfig()
    low, high = wilson_interval(1, 1, config.rm_accuracy_z)
    assert low < 0.5 < high  # one right answer out of one says nothing yet
    assert "lower bound" in rm_accuracy_check(1.0, 1, config)  # the normal approximation gave 1.0 here
    assert "lower bound" in rm_accuracy_check(2 / 3, 3, config)
    assert rm_accuracy_check(1.0, 8, config) == ""  # eight of eight does
    assert wilson_interval(5, 10, 0.0) == pytest.approx((0.5, 0.5))  # z = 0: the plain share
    lo_more, _ = wilson_interval(80, 100, 1.28)
    lo_less, _ = wilson_interval(8, 10, 1.28)
    assert 0.5 < lo_less < lo_more < 0.8  # the same share over more votes: a tighter bound
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2, 1.0)


def test_one_fixed_answer_per_prompt_is_rejected_as_collapsed_within_prompts():
    prompt_ids = [i % 4 for i in range(8)]  # 4 prompts, two samples each
    live = [f"answer {i}" for i in range(8)]  # live varies its answer to each prompt
    fixed = [f"the answer to {p}" for p in prompt_ids]  # one fixed answer per prompt: distinct across prompts
    result = _decide(candidate_answers=fixed, prompt_ids=prompt_ids, live_answers=live)
    assert result.metrics["gate/distinct"] == 1.0  # the check across prompts sees nothing wrong
    assert result.metrics["gate/within_diversity"] == 0.0 and result.metrics["gate/live_within_diversity"] == 1.0
    assert not result.passed and "within prompts" in result.reason
    # the same candidate beside a live version that is just as fixed: no loss of diversity
    assert _decide(candidate_answers=fixed, prompt_ids=prompt_ids, live_answers=list(fixed)).passed
    varied = [f"take {i} on {p}" for i, p in enumerate(prompt_ids)]
    assert _decide(candidate_answers=varied, prompt_ids=prompt_ids, live_answers=live).passed


def test_within_prompt_diversity_counts_extra_samples_that_differ():
    from training.gate import within_prompt_diversity

    # prompt 0: a, a, b (one of two extra samples differs); prompt 1: c, d (the one extra differs)
    assert within_prompt_diversity(["a", "a", "b", "c", "d"], [0, 0, 0, 1, 1]) == pytest.approx((0.5 + 1.0) / 2)
    assert within_prompt_diversity(["a", "b"], [0, 1]) is None  # no prompt sampled twice


def test_truncation_heavy_candidate_is_rejected():
    live_cut = torch.tensor([True] + [False] * 7)  # live: 1 of 8 answers cut at the length limit
    cut = torch.tensor([True] * 4 + [False] * 4)  # candidate: 4 of 8, at the same mean length
    result = _decide(candidate_truncated=cut, live_truncated=live_cut)
    assert result.metrics["gate/truncated"] == 0.5 and result.metrics["gate/live_truncated"] == 0.125
    assert not result.passed and "cut at the length limit" in result.reason
    one_more = torch.tensor([True] * 2 + [False] * 6)  # 2 of 8: 12.5 points more, over the 10 allowed
    assert not _decide(candidate_truncated=one_more, live_truncated=live_cut).passed
    assert _decide(candidate_truncated=live_cut.clone(), live_truncated=live_cut).passed
    assert _decide(candidate_truncated=one_more, live_truncated=live_cut,
                   config=GateConfig(min_win_rate=0.55, max_truncated_increase=0.2)).passed


def test_a_candidate_identical_to_live_is_rejected_without_sampling(tiny_model_dir, single_thread):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    policy = add_lora(model, LoraSettings(r=4), adapter_name="live")  # fresh LoRA: B = 0, the base
    policy.add_adapter("copy", LoraSettings(r=4).peft_config())  # other random A, B = 0 too
    policy.add_adapter("moved", LoraSettings(r=4).peft_config())
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B.moved" in name:
                p.fill_(1e-4)  # a small but real change
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    lenient = GateConfig(n_prompts=8, max_new_tokens=4, min_win_rate=0.0, max_kl=1e9, min_distinct=0.0,
                         min_within_ratio=0.0, max_length_ratio=1e9, max_truncated_increase=1.0)
    calls = []

    def reward(p, a):
        calls.append(len(a))
        return torch.zeros(len(a))

    for against in ("live", None):  # against live, and against the reference (no adapter)
        same = run_gate(policy, tok, reward, prompts, lenient, candidate_adapter="copy", live_adapter=against)
        assert not same.passed and "do not differ from live" in same.reason
    assert calls == []  # rejected before any answer was sampled or scored
    moved = run_gate(policy, tok, reward, prompts, lenient, candidate_adapter="moved", live_adapter="live")
    assert moved.passed, moved.reason
    assert moved.metrics["gate/weight_change"] > 0
