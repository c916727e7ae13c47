"""Reward-model training: the pairwise loss, training on votes, scoring answers, normalising scores.

Loss: Bradley-Terry (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT eq. 1)
``-log σ(r_chosen − r_rejected)``; a tie is a pair with target ½, i.e. the cross-entropy
``-(½ log σ(d) + ½ log σ(−d))``, minimised at equal scores. Pairs whose two texts are identical
carry no information and are dropped. "Both bad" votes are stored by the app but are not pairs
for this loss: callers leave them out (a pair dict with ``"both_bad": True`` is dropped here too).

The model itself — the head on the answer's last token and the learned weights on the
reference policy's log-probs of the answer — is :class:`training.reward_model.RewardModel`.

The held-out split is by conversation (a stable hash of ``conversation_id`` and the seed), so a
conversation never moves between splits as votes accumulate and successive reward models can be
compared on the same held-out pairs (:func:`split_by_conversation`, :func:`evaluate_pairs`). The
held-out pairs are halved the same way (:func:`training.preferences.split_heldout`): reward
models compete on the *select* half (``rm/accuracy``), and the one kept is judged on the
*judge* half (``rm/judge_accuracy``), votes it was not selected on.

After training, the ensemble heads are fitted on the training pairs (:mod:`training.ensemble`).

Scores are normalised before PPO to mean 0, std 1 over the reference policy's answers and
clipped (:class:`RewardNormalizer`; Ziegler et al. 2019, InstructGPT).

A round (:mod:`training.round`) calls :func:`train_reward_model`. From the command line, on a
data dir's votes (the pairs a round trains on) or on pairs exported with ``python -m storage
export`` (TRL's conversational preference format)::

    python -m training.reward_training --model DIR_OR_HUB_ID --data-dir data --out rm/ [--epochs 3 ...]
    python -m training.reward_training --model DIR_OR_HUB_ID --pairs votes.jsonl --out rm/
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, replace

import torch

from training import distributed
from training.ensemble import EnsembleConfig, conservative_scores, fit_heads
from training.flags import add_dataclass_args, dataclass_from_args, help_field, nested
from training.models import (
    LoraSettings,
    eval_with_checkpointing,
    unused_adapter_name,
    using_adapter,
)
from training.preferences import (
    answer_span,
    conversation_folds,
    encode_pairs,
    load_pairs_jsonl,
    split_by_conversation,
    split_heldout,
)
from training.reward_model import RewardModel
from training.rollout import right_pad
from training.seeds import derive_seed

log = logging.getLogger(__name__)

class NotEnoughVotesError(ValueError):
    """Fewer usable preference pairs than ``RewardConfig.min_votes``; the round should be skipped."""


@dataclass
class RewardConfig:
    """Reward-model training hyper-parameters."""

    lr: float = help_field(3e-4, help="AdamW learning rate for the LoRA weights and the head")
    epochs: int = help_field(4, help="passes over the training pairs")
    batch_size: int = help_field(8, help="pairs per gradient step")
    max_length: int = help_field(512, help="tokens of prompt ⧺ answer kept (the prompt is cut from the left)")
    heldout_fraction: float = help_field(0.25, help="share of conversations held out: half selects among reward models, half judges the one kept")
    seed: int = help_field(0, help="split, shuffling and head initialisation")
    min_votes: int = help_field(10, help="fewer usable pairs than this: NotEnoughVotesError")
    max_grad_norm: float = help_field(1.0, help="gradient clipping (global L2 norm)")
    lora: LoraSettings = help_field(default_factory=LoraSettings, help="the reward model's own adapter")
    reference_features: bool = help_field(
        True, help="add learned, non-negative weights on the reference policy's mean and min token "
        "log-prob of the answer to the score (a new model only; a warm start keeps its own choice)")
    feature_lr: float = help_field(0.1, help="AdamW learning rate of the reference-feature weights")
    ensemble: EnsembleConfig = nested(EnsembleConfig, help="ensemble heads on bootstrap resamples", set_by_parent=("seed",))
    cv_folds: int = help_field(
        3, help="folds of the cross-validated accuracy a round's gate checks: every vote outside the select half, each "
        "judged by a fresh reward model trained on the other folds (0: the judge half alone)")

    def __post_init__(self):
        for name in ("lr", "epochs", "batch_size", "max_length", "max_grad_norm", "feature_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RewardConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_length < 2:
            raise ValueError(f"RewardConfig.max_length must be >= 2 (a token before the answer), got {self.max_length}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"RewardConfig.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.min_votes < 1:
            raise ValueError(f"RewardConfig.min_votes must be >= 1, got {self.min_votes}")
        if self.cv_folds < 0 or self.cv_folds == 1:
            raise ValueError(f"RewardConfig.cv_folds must be 0 (off) or >= 2, got {self.cv_folds}")
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.ensemble, dict):
            self.ensemble = EnsembleConfig(**self.ensemble)
        self.ensemble = replace(self.ensemble, seed=derive_seed(self.seed, "ensemble"))


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, tie: torch.Tensor | None = None) -> torch.Tensor:
    """Tie-aware Bradley-Terry loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).

    Binary cross-entropy of σ(r_chosen − r_rejected) against target 1 (a preference) or ½ (a
    tie): ``-log σ(d)`` for a preference, ``-(½ log σ(d) + ½ log σ(−d))`` for a tie.

    Args: (B,) scores and (B,) bool ties. Returns the mean over the batch (scalar, nats).
    """
    d = r_chosen - r_rejected
    target = torch.ones_like(d)
    if tie is not None:
        target = torch.where(tie.to(torch.bool), torch.full_like(d, 0.5), target)
    return torch.nn.functional.binary_cross_entropy_with_logits(d, target)


def _eval(rm: RewardModel) -> None:
    """The reward model in eval mode (no dropout), its backbone's checkpointed layers still
    flagged for checkpointing: the backbone may be the round's policy, whose PPO pass must keep
    them (:func:`training.models.eval_with_checkpointing`)."""
    rm.eval()
    eval_with_checkpointing(rm.backbone)


def _pad_right(rows: list[list[int]], pad_id: int, answer_lens: list[int]) -> tuple[torch.Tensor, ...]:
    """Right-pad token lists to ``(ids, attention mask, answer mask)``, each (B, T); the answer
    is the last ``answer_lens[i]`` real tokens of row i."""
    ids, mask = right_pad(rows, pad_id)
    answer = torch.zeros_like(mask)
    for i, (r, n) in enumerate(zip(rows, answer_lens, strict=True)):
        answer[i, len(r) - n:len(r)] = 1
    return ids, mask, answer


def _pair_rows(rm: RewardModel, batch: list[dict], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, answer mask), each (2B, T) on the model's device: the B chosen
    rows, then the B rejected ones, right-padded."""
    ids, mask, answer = _pad_right(
        [p["chosen_ids"] for p in batch] + [p["rejected_ids"] for p in batch], pad_id,
        [p["chosen_answer_len"] for p in batch] + [p["rejected_answer_len"] for p in batch])
    device = rm.head.weight.device
    return ids.to(device), mask.to(device), answer.to(device)


def _pair_scores(rm: RewardModel, batch: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores (B,), (B,) from one forward of 2B right-padded rows."""
    scores = rm(*_pair_rows(rm, batch, pad_id))  # (2B,)
    return scores[: len(batch)], scores[len(batch):]


@torch.no_grad()
def fit_ensemble(rm: RewardModel, tokenizer, encoded: list[dict], config: EnsembleConfig,
                 batch_size: int = 16) -> None:
    """Give ``rm`` ``config.members`` ensemble heads fitted on the encoded training pairs
    (:func:`training.ensemble.fit_heads` on the frozen last hidden states); with no members or
    no pairs, ``rm`` keeps no ensemble."""
    rm.ensemble = None
    if config.members == 0 or not encoded:
        return
    _eval(rm)
    hc, hr, off, ties = [], [], [], []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        h, offset = rm.parts(*_pair_rows(rm, batch, tokenizer.pad_token_id))  # (2B, H), (2B,)
        B = len(batch)
        hc.append(h[:B].cpu())
        hr.append(h[B:].cpu())
        off.append((offset[:B] - offset[B:]).cpu())
        ties += [p["tie"] for p in batch]
    weights = fit_heads(torch.cat(hc), torch.cat(hr), torch.cat(off), torch.tensor(ties),
                        rm.head.weight.detach()[0].cpu(), config)  # (K, H)
    heads = torch.nn.Linear(weights.shape[1], weights.shape[0])
    with torch.no_grad():
        heads.weight.copy_(weights)
        heads.bias.fill_(float(rm.head.bias.detach()[0]))
    rm.ensemble = heads.requires_grad_(False).to(rm.head.weight.device)


@torch.no_grad()
def evaluate_pairs(rm: RewardModel, tokenizer, encoded: list[dict], batch_size: int = 16) -> dict:
    """Held-out figures of ``rm`` on encoded pairs: ``rm/accuracy`` (share of non-tie pairs with
    r_chosen > r_rejected; NaN if there are none), ``rm/heldout_loss`` (NaN if no pairs) and
    ``rm/heldout_decisive`` (how many non-tie pairs the accuracy is over)."""
    _eval(rm)
    correct, n_pref, losses = 0, 0, []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        rc, rr = _pair_scores(rm, batch, tokenizer.pad_token_id)
        tie = torch.tensor([p["tie"] for p in batch], device=rc.device)
        losses.append(float(pairwise_loss(rc, rr, tie)) * len(batch))
        correct += int(((rc > rr) & ~tie).sum())
        n_pref += int((~tie).sum())
    return {
        "rm/accuracy": correct / n_pref if n_pref else float("nan"),
        "rm/heldout_loss": sum(losses) / len(encoded) if encoded else float("nan"),
        "rm/heldout_decisive": float(n_pref),
    }


def _train_epochs(rm: RewardModel, tokenizer, train: list[dict], config: RewardConfig, optimizer,
                  params: list[torch.nn.Parameter]) -> float:
    """``config.epochs`` shuffled passes of the pairwise loss over ``train`` (encoded pairs);
    returns the last epoch's mean loss (NaN with no epochs). Data-parallel (:mod:`training.distributed`):
    each rank's shard of a batch weighted by its share, gradients summed: one process's steps."""
    rng = random.Random(config.seed)
    epoch_loss = float("nan")
    distributed.broadcast_tensors(params)
    for _epoch in range(config.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = [train[i] for i in order[start:start + config.batch_size]]
            mine = distributed.shard(batch)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            if mine:
                rc, rr = _pair_scores(rm, mine, tokenizer.pad_token_id)
                loss = pairwise_loss(rc, rr, torch.tensor([p["tie"] for p in mine], device=rc.device))
                (loss * (len(mine) / len(batch))).backward()
                loss_sum = float(loss.detach()) * len(mine)
            distributed.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            total += distributed.sum_floats([loss_sum])[0]
        epoch_loss = total / max(len(train), 1)
    return epoch_loss


def _fit(rm: RewardModel, tokenizer, train: list[dict], config: RewardConfig) -> float:
    """Train ``rm``'s adapter, head and feature weights on encoded pairs ``train`` (AdamW,
    :func:`_train_epochs`); returns the last epoch's mean loss."""
    params = rm.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": [p for p in params if p is not rm.feature_weight], "lr": config.lr}]
    if rm.feature_weight is not None:
        groups.append({"params": [rm.feature_weight], "lr": config.feature_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    _eval(rm)  # no dropout in the backbone; LoRA dropout is a LoraSettings choice
    # the whole step under the reward model's adapter: a checkpointed layer is recomputed in the
    # backward pass with whichever adapter is active then (on a shared base: the policy's)
    with using_adapter(rm.backbone, rm.adapter):
        epoch_loss = _train_epochs(rm, tokenizer, train, config, optimizer, params)
    optimizer.zero_grad(set_to_none=True)
    return epoch_loss


def _usable_split(tokenizer, pairs: list[dict], config: RewardConfig) -> tuple[list, list, list, list]:
    """``(encoded, train, select, judge)``: the usable pairs and their split by conversation
    (:func:`split_by_conversation`, then :func:`split_heldout`); when every conversation so far
    hashed to the held-out side, all are trained on and none judged."""
    encoded = encode_pairs(tokenizer, pairs, config.max_length)
    train, heldout = split_by_conversation(encoded, config.heldout_fraction, config.seed)
    if not train:
        train, heldout = heldout, []
    select, judge = split_heldout(heldout, config.heldout_fraction, config.seed)
    return encoded, train, select, judge


@torch.no_grad()
def _agreement(rm: RewardModel, tokenizer, encoded: list[dict], batch_size: int) -> list[bool | None]:
    """For each encoded pair: whether ``rm`` scores its chosen answer above its rejected one
    (None for a tie)."""
    _eval(rm)
    out: list[bool | None] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        rc, rr = _pair_scores(rm, batch, tokenizer.pad_token_id)
        out += [None if p["tie"] else bool(c > r) for p, c, r in zip(batch, rc.tolist(), rr.tolist(), strict=True)]
    return out


def out_of_fold_agreement(base, tokenizer, encoded: list[dict], fold_of: list[int], config: RewardConfig,
                          adapter: str = "reward_fold") -> tuple[list[bool | None], int]:
    """Each encoded pair judged by a reward model that never saw its fold: for every fold, a
    fresh reward model (from the base weights, no ensemble) is trained on the other folds'
    pairs (:func:`_fit`) and scores this fold's.

    Args:
        base: as :func:`train_reward_model` (each fold's model is adapter ``adapter_i`` on it,
            deleted after its fold).
        fold_of: one fold index per pair (any integers; pairs with equal ones share a fold).

    Returns:
        ``(agrees, folds_used)``: per pair, whether its fold's model scores the chosen answer
        above the rejected one (None for a tie, or when every pair is in its fold, so there was
        nothing to train on); how many folds were trained and judged.

    Raises:
        ValueError: ``fold_of`` and ``encoded`` differ in length.
    """
    if len(fold_of) != len(encoded):
        raise ValueError(f"{len(encoded)} pairs but {len(fold_of)} folds")
    agrees: list[bool | None] = [None] * len(encoded)
    used = 0
    for fold in sorted(set(fold_of)):
        fit_on = [p for p, f in zip(encoded, fold_of, strict=True) if f != fold]
        mine = [i for i, f in enumerate(fold_of) if f == fold]
        if not fit_on:
            continue
        rm = RewardModel.from_base(base, config.lora, seed=config.seed, reference_features=config.reference_features,
                                   adapter=unused_adapter_name(base, f"{adapter}_{fold}"))
        try:
            _fit(rm, tokenizer, fit_on, config)
            for i, agree in zip(mine, _agreement(rm, tokenizer, [encoded[i] for i in mine], config.batch_size),
                                strict=True):
                agrees[i] = agree
        finally:
            rm.release()
        used += 1
    return agrees, used


def cross_validated_accuracy(base, tokenizer, pairs: list[dict], config: RewardConfig,
                             adapter: str = "reward_cv") -> dict:
    """How well a reward model learns these votes, measured on votes it never saw: k-fold
    cross-validation (k = ``config.cv_folds``, folds by conversation,
    :func:`training.preferences.conversation_folds`) over every usable pair outside the
    *select* half (which chooses among reward models, so it is left out here). Each fold's pairs
    are scored by a fresh reward model (from the base weights, never a warm start: an earlier
    model was trained on them) trained on the other folds; the accuracies are pooled over all
    folds' non-tie pairs.

    With few votes this judges several times more of them than the judge half alone (at 100
    votes: about 85 instead of 13), so the gate's Wilson bound can tell a useful reward model
    from chance; it measures the training procedure on ``(k − 1)/k`` of the data, a slightly
    pessimistic estimate for the model trained on all of it.

    Args:
        base: as :func:`train_reward_model` (each fold's model is adapter ``adapter_i`` on it,
            deleted after its fold).

    Returns:
        ``rm/cv_accuracy`` (NaN without a non-tie pair), ``rm/cv_decisive`` (the non-tie pairs
        it is over), ``rm/cv_folds`` (folds that had pairs to train and to judge), ``rm/cv_s``.

    Raises:
        ValueError: ``config.cv_folds`` < 2.
    """
    t0 = time.time()
    _, train, _, judge = _usable_split(tokenizer, pairs, config)
    pool = train + judge
    agrees, used = out_of_fold_agreement(base, tokenizer, pool, conversation_folds(pool, config.cv_folds, config.seed),
                                         config, adapter)
    correct = sum(a is True for a in agrees)
    decisive = sum(a is not None for a in agrees)
    accuracy = correct / decisive if decisive else float("nan")
    log.info("reward model, %d-fold cross-validated: accuracy=%.3f over %d A/B votes", config.cv_folds,
             accuracy, decisive)
    return {"rm/cv_accuracy": accuracy, "rm/cv_decisive": float(decisive), "rm/cv_folds": float(used),
            "rm/cv_s": time.time() - t0}


def train_reward_model(base, tokenizer, pairs: list[dict], config: RewardConfig, init_dir=None,
                       adapter: str = "reward") -> tuple[RewardModel, dict]:
    """Train a reward model on preference pairs.

    Args:
        base: hub id or directory of the policy's base model (loaded afresh, frozen), or the
            model itself (a round's policy): the reward model is then adapter ``adapter`` on
            the same base weights (:meth:`RewardModel.from_base`).
        pairs: see :func:`encode_pairs`; identical-text and ``both_bad`` pairs are dropped.
        init_dir: a previous reward model (:meth:`RewardModel.save`) to warm-start from.

    Returns:
        ``(rm, metrics)``: ``rm/accuracy`` (the *select* half of the held-out pairs, non-tie;
        NaN if none), ``rm/heldout_loss``, ``rm/heldout_decisive``, ``rm/judge_accuracy`` and
        ``rm/judge_decisive`` (the *judge* half), ``rm/loss`` (mean train loss of the last
        epoch), ``rm/train_pairs``, ``rm/heldout_pairs``, ``rm/heldout_conversations``,
        ``rm/ties``, ``rm/dropped_pairs``, ``rm/prev_accuracy`` and ``rm/prev_judge_accuracy``
        (the ``init_dir`` model on the same halves before training, NaN without one: keep the
        new RM only if ``rm/accuracy >= rm/prev_accuracy``), ``rm/ensemble_members``,
        ``rm/train_s``.

    Raises:
        NotEnoughVotesError: fewer usable pairs than ``config.min_votes``.
    """
    t0 = time.time()
    encoded, train, select, judge = _usable_split(tokenizer, pairs, config)
    if len(encoded) < config.min_votes:
        raise NotEnoughVotesError(
            f"only {len(encoded)} usable preference pairs ({len(pairs) - len(encoded)} dropped as "
            f"identical or both-bad); at least {config.min_votes} are needed (min_votes)"
        )
    heldout = select + judge
    heldout_ids = [p["conversation_id"] for p in heldout]
    prev: dict = {}
    prev_judge: dict = {}
    if init_dir is not None:
        rm = RewardModel.load(base, init_dir, trainable=True, adapter=adapter)
        prev = evaluate_pairs(rm, tokenizer, select, config.batch_size)  # same split, before training
        prev_judge = evaluate_pairs(rm, tokenizer, judge, config.batch_size)
    else:
        rm = RewardModel.from_base(base, config.lora, seed=config.seed,
                                   reference_features=config.reference_features, adapter=adapter)
    epoch_loss = _fit(rm, tokenizer, train, config)
    fit_ensemble(rm, tokenizer, train, config.ensemble, config.batch_size)
    metrics = evaluate_pairs(rm, tokenizer, select, config.batch_size)
    judged = evaluate_pairs(rm, tokenizer, judge, config.batch_size)
    metrics.update({
        "rm/judge_accuracy": judged["rm/accuracy"],
        "rm/judge_decisive": judged["rm/heldout_decisive"],
        "rm/prev_judge_accuracy": prev_judge.get("rm/accuracy", float("nan")),
        "rm/ensemble_members": rm.members,
        "rm/loss": epoch_loss,
        "rm/train_pairs": len(train),
        "rm/heldout_pairs": len(heldout),
        "rm/ties": sum(p["tie"] for p in encoded),
        "rm/dropped_pairs": len(pairs) - len(encoded),
        "rm/prev_accuracy": prev.get("rm/accuracy", float("nan")),
        "rm/heldout_conversations": len(set(heldout_ids)),
        "rm/train_s": time.time() - t0,
        **{f"rm/w_{name}": w for name, w in rm.feature_weights().items()},
    })
    log.info("reward model: accuracy=%.3f loss=%.4f train=%d heldout=%d", metrics["rm/accuracy"],
             epoch_loss, len(train), len(heldout))
    return rm, metrics


@torch.no_grad()
def score(rm: RewardModel, tokenizer, prompts: list[list[dict]], answers: list[str],
          batch_size: int = 16, max_length: int = 512, members: bool = False) -> torch.Tensor:
    """Raw reward-model scores (B,) of ``answers`` to ``prompts`` (answers rendered as an
    assistant turn ending with the end-of-turn token); with ``members``, the ensemble's (K, B).

    Raises:
        ValueError: ``prompts`` and ``answers`` differ in length; ``members`` and no ensemble.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    _eval(rm)
    spans = [answer_span(tokenizer, p, a, max_length) for p, a in zip(prompts, answers, strict=True)]
    device = rm.head.weight.device
    out = []
    for start in range(0, len(spans), batch_size):
        chunk = spans[start:start + batch_size]
        ids, mask, answer = _pad_right([r for r, _ in chunk], tokenizer.pad_token_id, [n for _, n in chunk])
        forward = rm.member_scores if members else rm
        out.append(forward(ids.to(device), mask.to(device), answer.to(device)).float().cpu())
    if not out:
        return torch.zeros((rm.members, 0) if members else 0)
    return torch.cat(out, dim=-1)


def make_reward_fn(rm: RewardModel, tokenizer, batch_size: int = 16, max_length: int = 512,
                   conservative: float = 0.0):
    """``reward_fn(prompts, answers) -> (B,)`` raw scores, the callable :func:`training.ppo.ppo_train`
    takes. With ``conservative`` = λ > 0 and an ensemble: the members' mean − λ·std
    (:func:`training.ensemble.conservative_scores`) instead of the main head's score."""

    def reward_fn(prompts: list[list[dict]], answers: list[str]) -> torch.Tensor:
        if conservative > 0 and rm.members:
            members = score(rm, tokenizer, prompts, answers, batch_size, max_length, members=True)
            return conservative_scores(members, conservative)
        return score(rm, tokenizer, prompts, answers, batch_size, max_length)

    return reward_fn


@dataclass
class RewardNormalizer:
    """Affine normalisation of scores: (s − mean) / std, then clipped to ±clip (0 = no clip).

    Fitted on the reference policy's answers so they score mean 0, std 1 (Ziegler et al. 2019;
    Ouyang et al. 2022)."""

    mean: float = 0.0
    std: float = 1.0
    clip: float = 5.0

    @classmethod
    def fit(cls, scores: torch.Tensor, clip: float = 5.0, min_std: float = 1e-3) -> RewardNormalizer:
        """Fit on (N,) scores; std below ``min_std`` is raised to it (constant scores).

        Raises:
            ValueError: no scores.
        """
        scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
        if scores.numel() == 0:
            raise ValueError("RewardNormalizer.fit needs at least one score")
        std = float(scores.std()) if scores.numel() > 1 else 0.0
        return cls(float(scores.mean()), max(std, min_std), clip)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        out = (torch.as_tensor(scores, dtype=torch.float32) - self.mean) / self.std
        return out.clamp(-self.clip, self.clip) if self.clip > 0 else out


def main(argv: list[str] | None = None) -> int:
    """Command line: train a reward model on a data dir's votes or a JSONL file of pairs and save it."""
    parser = argparse.ArgumentParser(prog="python -m training.reward_training",
                                     description="Train a reward model on preference pairs.")
    parser.add_argument("--model", required=True, help="base model: hub id or local directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="an app's data dir: its votes, as a round reads them")
    source.add_argument("--pairs", help="JSONL preference pairs (python -m storage export)")
    parser.add_argument("--out", required=True, help="directory to save the reward model to")
    parser.add_argument("--init-dir", default=None, help="a saved reward model to warm-start from")
    add_dataclass_args(parser, RewardConfig)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(RewardConfig, args)
        if args.pairs:
            pairs = load_pairs_jsonl(args.pairs)
        else:
            from storage.paths import DataDir
            from storage.store import open_store

            with open_store(DataDir(args.data_dir).require()) as store:
                pairs = store.vote_pairs()
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    from training.models import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tokenizer = load_tokenizer(args.model)
    try:
        rm, metrics = train_reward_model(args.model, tokenizer, pairs, config, init_dir=args.init_dir)
    except NotEnoughVotesError as exc:
        print(f"not trained: {exc}", file=sys.stderr)
        return 2
    rm.save(args.out)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
