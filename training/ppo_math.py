"""The pure, hand-checkable pieces of PPO (used by :func:`training.ppo.ppo_train`): per-token
KL, generalised advantage estimation, whitening, the clipped policy and value losses, and the KL
controllers, and which prompts and rows an iteration trains on. Tensors are (B, T) over answer
tokens with a 0/1 mask; KL in nats."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; (B, T), (B, T) → scalar."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(π ‖ π_ref) per sampled token: log π(a) − log π_ref(a), (B, T) nats.

    Unbiased for the sequence KL when the tokens are sampled from π; this is the quantity both
    penalised in the reward and logged as ``objective/kl`` (Ziegler et al. 2019)."""
    return logprobs - ref_logprobs


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16).

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns R_t = A_t + V_t, with
    V and A zero after the last answer token.

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) value estimates V_t.
        mask: (B, T) 1 on answer tokens; must be a prefix per row (right-padded answers).

    Returns:
        ``(advantages (B, T), returns (B, T))``, zero where ``mask`` is 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])  # A_{t+1}, (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           total: Callable[[list[float]], list[float]] | None = None) -> torch.Tensor:
    """(B, T) → (B, T): mean 0 (unless ``shift_mean=False``) and std 1 over masked positions,
    zero elsewhere. Uses the unbiased variance. ``total``: sums a list of floats over the
    processes of a data-parallel round (:func:`training.distributed.sum_floats`), so the mean
    and variance are those of every process's positions together; None: this ``x`` alone."""
    m = mask.to(x.dtype)
    if total is None:
        n = m.sum()
        mean = (x * m).sum() / n.clamp(min=1.0)
        var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1.0)
    else:
        count, summed = total([float(m.sum()), float((x * m).sum())])
        mean = torch.tensor(summed / max(count, 1.0), dtype=x.dtype, device=x.device)
        (squares,) = total([float((((x - mean) * m) ** 2).sum())])
        var = torch.tensor(squares / max(count - 1.0, 1.0), dtype=x.dtype, device=x.device)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def leave_one_out_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Centre each score on the mean of the other answers to the same prompt.

    ``scores`` (B,) hold ``B / group_size`` groups of ``group_size`` adjacent answers to one
    prompt each; returns (B,) ``s_i − mean_{j ≠ i} s_j`` within each group. The baseline does not
    depend on the answer it is subtracted from, so the policy gradient stays unbiased while the
    part of the score that belongs to the prompt (an easy question scores high whatever the
    answer) is removed (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!";
    Ahmadian et al. 2024, RLOO).

    Raises:
        ValueError: ``group_size`` < 2 or not a divisor of B.
    """
    B = scores.shape[0]
    if group_size < 2 or B % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch ({B}), got {group_size}")
    groups = scores.reshape(B // group_size, group_size)  # (G, k)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)  # (G, k)
    return (groups - others).reshape(B)


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    eq. 7), as a loss to minimise:  mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε, 1+ε)),
    ρ_t = exp(log π − log π_old).

    Args: (B, T) tensors; ``mask`` 1 on answer tokens.

    Returns:
        ``(loss, clipfrac, approx_kl)`` scalars: the fraction of tokens where the clipped term
        was taken, and ½·mean (log π − log π_old)² (nats per token).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
    mask: torch.Tensor, cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (Schulman et al. 2017 baselines; TRL's PPO):
    ½ · mean_t max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²).

    Returns ``(loss, clipfrac)`` scalars; clipfrac is the fraction of tokens where the clipped
    term was larger."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, clipfrac.detach()


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019, §2.2): e = clip(KL/target − 1, −0.2, 0.2),
    β ← β · (1 + e · n_steps / horizon). KL above target makes β grow, below makes it shrink."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError("init_kl_coef, target and horizon must all be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β from the observed KL (nats per answer) over ``n_steps`` samples; returns β."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """Constant β (``PPOConfig.adaptive_kl=False``)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# ---- which rows a PPO iteration trains on ----------------------------------------------------
def prompt_batches(n_prompts: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of prompt indices: shuffled passes over all prompts, repeated as needed."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < batch * steps:
        idx = list(range(n_prompts))
        rng.shuffle(idx)
        order += idx
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def minibatch_rows(rows: int, size: int, generator: torch.Generator, first: int = 0,
                   held: int | None = None) -> list[torch.Tensor]:
    """One epoch's minibatches of a batch of ``rows`` rows: a random permutation (drawn from
    ``generator``) cut into runs of ``size``; each minibatch as the indices, among the ``held``
    rows ``first … first + held − 1`` that this process holds, of those in it (in a
    data-parallel round each rank holds a contiguous part of the batch; the same generator on
    every rank gives every rank the same minibatches, so their steps are one process's).

    Returns ``ceil(rows / size)`` tensors of local row indices (maybe empty), each row of the
    held part in exactly one."""
    held = rows - first if held is None else held
    perm = torch.randperm(rows, generator=generator)
    out = []
    for start in range(0, rows, size):
        part = perm[start:start + size]
        out.append(part[(part >= first) & (part < first + held)] - first)
    return out
