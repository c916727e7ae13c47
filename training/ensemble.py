"""The reward model's ensemble: how sure the votes make it, and which pair to ask users next.

**Members.** K linear heads on the reward model's last hidden state ``h`` (the adapter and the
reference-feature term are shared; :class:`training.reward_model.RewardModel`), each fitted on a
bootstrap resample of the training votes (Efron 1979) as a MAP estimate under its own random
anchor: member k minimises

    mean over its resample of BCE(σ(w_k·(h_chosen − h_rejected) + Δoffset), target)
    + ‖w_k − a_k‖² / (2 σ² n),        a_k ~ N(w_head, σ² I),

the anchored ensemble of Pearce et al. 2020 ("Uncertainty in Neural Networks: Approximately
Bayesian Ensembling"), which approximates posterior samples of a linear head. ``target`` is 1 for
a preference and ½ for a tie; σ is ``prior_scale`` over the root-mean-square norm of
``h_chosen − h_rejected``, so a prior draw moves a pair's logit by about ``prior_scale``. Few
votes leave the members near their anchors and far apart; many votes pull them together.
The members are fitted on frozen features (one forward pass over the pairs), in seconds.

**Pair selection** (:func:`select_pair`) among n answers to one prompt, from the (K, n)
member scores:

* ``variance``: the pair whose preference probability σ(s_k,i − s_k,j) varies most across
  members, the information-seeking query of Dwaracherla et al. 2024 ("Efficient Exploration
  for LLMs"), whose ensemble-guided queries matched far larger random-query label budgets;
* ``dts``: double Thompson sampling (Wu & Liu 2016; used for LLM feedback by Dwaracherla et al.
  2024): a random member picks its best answer, another random member its best of the rest;
* ``random``: two answers at random (kept for a share of comparisons: unbiased evaluation).

**Conservative reward** (:func:`conservative_scores`): mean − λ·std over members, which keeps
PPO off answers the votes say little about (Coste et al. 2023, "Reward Model Ensembles Help
Mitigate Overoptimization").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from training.flags import help_field

PAIR_RULES = ("variance", "dts", "random")


@dataclass
class EnsembleConfig:
    """How the reward model's ensemble heads are fitted."""

    members: int = help_field(8, help="ensemble heads fitted on bootstrap resamples of the votes (0: no ensemble)")
    steps: int = help_field(200, help="full-batch AdamW steps per fit")
    lr: float = help_field(0.05, help="AdamW learning rate of the heads")
    prior_scale: float = help_field(1.0, help="prior spread of a member's logit on a pair, in logits (the anchor's σ)")
    seed: int = help_field(0, help="bootstrap resamples and anchors")

    def __post_init__(self):
        if self.members < 0 or self.members == 1:
            raise ValueError(f"EnsembleConfig.members must be 0 (none) or >= 2, got {self.members}")
        if self.steps < 1 or not self.lr > 0 or not self.prior_scale > 0:
            raise ValueError("EnsembleConfig.steps must be >= 1, lr and prior_scale > 0, got "
                             f"{self.steps}, {self.lr}, {self.prior_scale}")


def fit_heads(h_chosen: torch.Tensor, h_rejected: torch.Tensor, offset_diff: torch.Tensor,
              tie: torch.Tensor, head_weight: torch.Tensor, config: EnsembleConfig) -> torch.Tensor:
    """Fit ``config.members`` anchored bootstrap heads (see the module docstring).

    Args:
        h_chosen, h_rejected: (n, H) last hidden states of the chosen and rejected answers.
        offset_diff: (n,) chosen minus rejected reference-feature term (fixed).
        tie: (n,) bool, the pair is a tie (target ½).
        head_weight: (H,) the main head's weight, the centre of the anchors.

    Returns:
        (K, H) float32 member weights.

    Raises:
        ValueError: no pairs, or mismatched shapes.
    """
    n = h_chosen.shape[0]
    if n == 0 or h_rejected.shape != h_chosen.shape or offset_diff.shape != (n,) or tie.shape != (n,):
        raise ValueError(f"fit_heads needs n > 0 pairs of equal shapes, got {tuple(h_chosen.shape)}, "
                         f"{tuple(h_rejected.shape)}, {tuple(offset_diff.shape)}, {tuple(tie.shape)}")
    K = config.members
    diff = (h_chosen - h_rejected).float()  # (n, H)
    target = torch.where(tie.bool(), 0.5, 1.0).float()  # (n,)
    sigma = config.prior_scale / float(diff.pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-6))
    gen = torch.Generator().manual_seed(config.seed)
    anchors = head_weight.float()[None] + sigma * torch.randn(K, diff.shape[1], generator=gen)  # (K, H)
    counts = torch.stack([torch.bincount(torch.randint(n, (n,), generator=gen), minlength=n)
                          for _ in range(K)]).float()  # (K, n) bootstrap multiplicities
    weights = anchors.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([weights], lr=config.lr, weight_decay=0.0)
    offset = offset_diff.float()
    with torch.enable_grad():
        for _ in range(config.steps):
            logits = weights @ diff.T + offset[None]  # (K, n)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, target.expand(K, n), reduction="none")
            loss = ((bce * counts).sum(dim=1) / n + (weights - anchors).pow(2).sum(dim=1) / (2 * sigma**2 * n)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return weights.detach()


def preference_variance(scores: torch.Tensor) -> torch.Tensor:
    """(K, n) member scores → (n, n): the variance across members of P(i preferred to j) =
    σ(s_k,i − s_k,j) (symmetric, zero diagonal)."""
    probs = torch.sigmoid(scores[:, :, None] - scores[:, None, :])  # (K, n, n)
    return probs.var(dim=0, unbiased=False)


def select_pair(scores: torch.Tensor, rule: str, rng: random.Random,
                allowed: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The pair of answers to show, by ``rule`` (``variance`` | ``dts`` | ``random``).

    Args:
        scores: (K, n) member scores of n >= 2 answers (``random`` ignores them).
        rng: the draw of ``dts`` and ``random``.
        allowed: the pairs ``(i, j)``, i < j, that may be shown (e.g. those with different
            texts); default all. ``dts`` falls back to the most uncertain allowed pair when its
            draws land on no allowed pair.

    Returns:
        ``(i, j)`` with i < j.

    Raises:
        ValueError: an unknown rule, fewer than two answers or no allowed pair.
    """
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {', '.join(PAIR_RULES)}, got {rule!r}")
    n = scores.shape[1]
    pairs = allowed if allowed is not None else [(i, j) for i in range(n) for j in range(i + 1, n)]
    if n < 2 or not pairs:
        raise ValueError(f"select_pair needs two answers and an allowed pair, got n = {n}, {len(pairs)} pairs")
    if rule == "random":
        return pairs[rng.randrange(len(pairs))]
    variance = preference_variance(scores.float())
    if rule == "dts":
        first = int(scores[rng.randrange(scores.shape[0])].argmax())
        order = scores[rng.randrange(scores.shape[0])].argsort(descending=True).tolist()
        for second in order:
            pair = (min(first, second), max(first, second))
            if second != first and pair in pairs:
                return pair
    return max(pairs, key=lambda p: float(variance[p[0], p[1]]))


def conservative_scores(scores: torch.Tensor, lam: float) -> torch.Tensor:
    """(K, B) member scores → (B,) mean − ``lam`` · std over members (Coste et al. 2023)."""
    return scores.mean(dim=0) - lam * scores.std(dim=0, unbiased=False)
