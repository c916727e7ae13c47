"""PPO's pure functions on hand-computed examples (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from training.ppo import PPOConfig
from training.ppo_math import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    leave_one_out_baseline,
    per_token_kl,
    whiten,
)
from training.rollout import logprobs_from_logits


def test_gae_hand_computed_three_steps():
    # γ = 1, λ = 0.95; rewards [0, 0, 1]; values [0.5, 0.6, 0.7]; V after the end = 0.
    # δ2 = 1 + 0 − 0.7 = 0.3                A2 = 0.3
    # δ1 = 0 + 0.7 − 0.6 = 0.1              A1 = 0.1 + 0.95·0.3   = 0.385
    # δ0 = 0 + 0.6 − 0.5 = 0.1              A0 = 0.1 + 0.95·0.385 = 0.46575
    # second row: mask [1, 1, 0]; rewards [0, 2, 5 (ignored)]; values [1, 1, 9 (ignored)]
    # δ1 = 2 + 0 − 1 = 1 → A1 = 1;  δ0 = 0 + 1 − 1 = 0 → A0 = 0.95;  A2 = 0
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3], [0.95, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0], [1.95, 2.0, 0.0]]))


def test_gae_discount():
    # γ = 0.5, λ = 1: A_t = Σ_k γ^k r_{t+k} − V_t (Monte-Carlo return minus baseline).
    rewards = torch.tensor([[1.0, 0.0, 4.0]])
    values = torch.zeros(1, 3)
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0 + 0.25 * 4.0, 0.5 * 4.0, 4.0]]))
    torch.testing.assert_close(ret, adv)


def test_clipped_policy_loss_hand_computed():
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, +1, −1, −1 and ε = 0.2:
    #   ρ=1.5,A=+1: max(−1.5, −1.2) = −1.2 (clipped)   ρ=0.5,A=+1: max(−0.5, −0.8) = −0.5
    #   ρ=0.5,A=−1: max( 0.5,  0.8) =  0.8 (clipped)   ρ=1.5,A=−1: max( 1.5,  1.2) =  1.5
    # loss = (−1.2 − 0.5 + 0.8 + 1.5) / 4 = 0.15; clipfrac = 2/4; the 5th token is masked out.
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5, 9.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(new, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_clipped_policy_loss_gradient_zero_when_clipped():
    new = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    loss, _, _ = clipped_policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.abs().item() == 0.0


def test_clipped_value_loss_hand_computed():
    # old 0, new 1, return 2, ε = 0.2: unclipped (1−2)² = 1; clipped (0.2−2)² = 3.24 → ½·3.24
    # old 0, new 0.1, return 0: unclipped 0.01; clipped 0.01 → ½·0.01
    loss, clipfrac = clipped_value_loss(
        torch.tensor([[1.0, 0.1]]), torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]),
        torch.ones(1, 2), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2, rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_logprobs_from_logits_and_kl():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    lp = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    kl = per_token_kl(torch.tensor([[-0.1, -2.0]]), torch.tensor([[-0.3, -2.0]]))
    torch.testing.assert_close(kl, torch.tensor([[0.2, 0.0]]))


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, mask)
    # mean 2, unbiased std 1 → [-1, 0, 1], masked entry 0
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_kl_controller_direction():
    high = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert high.update(current_kl=10.0, n_steps=10) > 0.1  # KL above target: β grows
    low = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert low.update(current_kl=1.0, n_steps=10) < 0.1  # below: β shrinks
    # e = clip(10/4 − 1, ±0.2) = 0.2: β = 0.1 · (1 + 0.2 · 10/100)
    assert high.value == pytest.approx(0.1 * 1.02)
    same = AdaptiveKLController(0.1, target=4.0, horizon=100)
    assert same.update(4.0, 10) == pytest.approx(0.1)


@pytest.mark.parametrize("field,value", [("cliprange", 0.0), ("lam", 1.5), ("steps", 0),
                                         ("mini_batch_size", 99), ("vf_coef", -1.0)])
def test_ppo_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})


def test_leave_one_out_baseline_hand_computed():
    # two prompts, four answers each: s_i − mean of the other three
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4 - 0])
    torch.testing.assert_close(leave_one_out_baseline(scores, 4), expected)
    # a constant added to one prompt's scores (an easy prompt) changes nothing
    shifted = scores + torch.tensor([5.0] * 4 + [0.0] * 4)
    torch.testing.assert_close(leave_one_out_baseline(shifted, 4), expected)
    with pytest.raises(ValueError, match="group_size"):
        leave_one_out_baseline(scores, 3)
    with pytest.raises(ValueError, match="group_size"):
        leave_one_out_baseline(scores, 1)
