"""Vote hygiene: no single voter steers the reward model, by volume or by voting against the rest.

A *voter* is the browser session that cast a vote (``Store.vote_pairs``' ``voter``). Before a
round's reward model trains (:func:`clean_votes`):

1. **Outliers are excluded.** Each voter with at least ``outlier_min_votes`` A/B votes is tested
   against everyone else, the test the Chatbot Arena applies to its users (Chiang et al. 2024,
   "Chatbot Arena", §5: a user's votes compared with what the other users' data predicts): the
   reference is the reward model in use (trained on earlier rounds' votes). ``p₀`` is the share
   of all *other* voters' A/B votes on which it prefers the chosen answer; a voter who agrees
   with it on ``k`` of ``n`` votes is an outlier when the one-sided binomial test
   ``P(X ≤ k | n, p₀)`` (``scipy.stats.binomtest``) is below ``outlier_alpha`` divided by the
   number of voters tested (Bonferroni: with many honest voters, one is still excluded by
   chance with probability ≤ ``outlier_alpha``). Nobody is tested while ``p₀ ≤ ½`` (a reference
   no better than chance says nothing). In a data dir's first round, with no reward model yet,
   the reference is *out of voter* (:func:`out_of_voter_judge`): the voters are dealt into
   ``reference_folds`` folds, and each fold's votes are judged by a fresh reward model trained
   on the other folds' votes alone. No vote is judged by a model that saw it or any other vote
   of its voter, so an outlier cannot pull the reference its way, and ``p₀`` is measured out of
   sample like the tested voter's own agreement.
   An outlier's votes all leave the round's data (they stay stored and exported).
2. **Floods are capped.** One voter's pairs may make up at most ``max_share`` of the data next
   to everyone else's: at most ``max(min_cap, max_share / (1 − max_share) · n_others)`` pairs,
   an evenly spaced subset in time order (old and new votes alike). A sole voter is never capped
   (there is no one to outvote).

Pairs without a voter (loaded from a JSONL file) are kept as they are.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from scipy.stats import binomtest

from training.flags import help_field
from training.models import unused_adapter_name
from training.preferences import encode_pairs
from training.reward_model import RewardModel
from training.reward_training import NotEnoughVotesError, RewardConfig, out_of_fold_agreement, score

log = logging.getLogger(__name__)


@dataclass
class VoterConfig:
    """Per-voter caps and the outlier test (``python -m training.jobs --voters.*``; the app's
    ``--round.voters.*``)."""

    max_share: float = help_field(
        0.3, help="most of the reward model's pairs one voter (session) may supply next to everyone else's (1: no cap)")
    min_cap: int = help_field(50, help="a voter's pairs are never capped below this many")
    outlier_alpha: float = help_field(
        0.01, help="family-wise level of the outlier test: a voter agreeing with the reward model in use "
        "significantly less than everyone else is excluded (0: no test)")
    outlier_min_votes: int = help_field(10, help="A/B votes a voter needs before being tested")
    reference_folds: int = help_field(
        3, help="folds of voters in the first round's out-of-voter reference (each judged by a reward model "
        "trained on the other folds)")

    def __post_init__(self):
        if not 0.0 < self.max_share <= 1.0:
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share}")
        if self.min_cap < 1:
            raise ValueError(f"min_cap must be >= 1, got {self.min_cap}")
        if not 0.0 <= self.outlier_alpha < 1.0:
            raise ValueError(f"outlier_alpha must be in [0, 1), got {self.outlier_alpha}")
        if self.outlier_min_votes < 1:
            raise ValueError(f"outlier_min_votes must be >= 1, got {self.outlier_min_votes}")
        if self.reference_folds < 2:
            raise ValueError(f"reference_folds must be >= 2, got {self.reference_folds}")


def outlier_voters(pairs: list[dict], agrees: list[bool | None], config: VoterConfig) -> dict[str, float]:
    """The voters the outlier test excludes, each with its p-value.

    Args:
        pairs: vote pairs with ``voter`` (None: not tested, still counts for ``p₀``) and ``tie``.
        agrees: one per pair: whether the reference prefers its chosen answer (None: not judged,
            e.g. a tie).
    """
    if len(agrees) != len(pairs):
        raise ValueError(f"{len(pairs)} pairs but {len(agrees)} judgements")
    hits, counts = Counter(), Counter()
    for pair, agree in zip(pairs, agrees, strict=True):
        if agree is None or pair["tie"]:
            continue
        hits[pair.get("voter")] += bool(agree)
        counts[pair.get("voter")] += 1
    tested = [v for v in counts if v is not None and counts[v] >= config.outlier_min_votes]
    if config.outlier_alpha <= 0 or not tested:
        return {}
    total_hits, total = sum(hits.values()), sum(counts.values())
    out = {}
    for voter in tested:
        others = total - counts[voter]
        if others == 0:
            continue
        p0 = (total_hits - hits[voter]) / others
        if p0 <= 0.5:
            continue
        p = binomtest(hits[voter], counts[voter], p0, alternative="less").pvalue
        if p < config.outlier_alpha / len(tested):
            out[voter] = float(p)
    return out


def cap_votes(pairs: list[dict], config: VoterConfig) -> list[dict]:
    """``pairs`` with each voter's share capped (module docstring, step 2); order kept."""
    by_voter: dict[str | None, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        by_voter[pair.get("voter")].append(i)
    voters = [v for v in by_voter if v is not None]
    if len(voters) < 2 or config.max_share >= 1.0:
        return list(pairs)
    keep = set(range(len(pairs)))
    for voter in voters:
        own = by_voter[voter]
        others = len(pairs) - len(own)
        cap = max(config.min_cap, math.floor(config.max_share / (1 - config.max_share) * others))
        if len(own) > cap:
            chosen = {own[math.floor(j * len(own) / cap)] for j in range(cap)}  # evenly spaced
            keep -= set(own) - chosen
    return [p for i, p in enumerate(pairs) if i in keep]


def clean_votes(pairs: list[dict], config: VoterConfig,
                judge: Callable[[list[dict]], list[bool | None]] | None) -> tuple[list[dict], dict]:
    """Outliers excluded, then floods capped (module docstring).

    Args:
        judge: the reference: pairs → whether it prefers each chosen answer; None (no reward
            model yet): no outlier test.

    Returns:
        ``(pairs, metrics)`` with ``voters/count``, ``voters/excluded`` (outlier voters),
        ``voters/excluded_pairs`` and ``voters/capped_pairs`` (pairs dropped by each step).
    """
    excluded = outlier_voters(pairs, judge(pairs), config) if judge is not None and config.outlier_alpha > 0 else {}
    for voter, p in excluded.items():
        log.warning("voter %s excluded from this round's reward model data: agrees with the reference reward "
                    "model less than the other voters do (binomial p = %.2g)", voter, p)
    kept = [p for p in pairs if p.get("voter") not in excluded]
    capped = cap_votes(kept, config)
    return capped, {
        "voters/count": float(len({p.get("voter") for p in pairs if p.get("voter") is not None})),
        "voters/excluded": float(len(excluded)),
        "voters/excluded_pairs": float(len(pairs) - len(kept)),
        "voters/capped_pairs": float(len(kept) - len(capped)),
    }


def reward_model_judge(rm, tokenizer, max_length: int = 512) -> Callable[[list[dict]], list[bool | None]]:
    """The judge of :func:`clean_votes` from a reward model: for each pair, whether it scores the
    chosen answer above the rejected one (None for ties)."""

    def judge(pairs: list[dict]) -> list[bool | None]:
        prompts = [p["prompt"] for p in pairs]
        chosen = score(rm, tokenizer, prompts, [p["chosen"] for p in pairs], max_length=max_length)
        rejected = score(rm, tokenizer, prompts, [p["rejected"] for p in pairs], max_length=max_length)
        return [None if p["tie"] else bool(c > r) for p, c, r in zip(pairs, chosen, rejected, strict=True)]

    return judge


def voter_folds(pairs: list[dict], folds: int) -> list[int]:
    """The fold (0 … ``folds`` − 1) of each pair, all of one voter's pairs in one fold (pairs
    without a voter: grouped by conversation). Groups are dealt largest first, each to the fold
    with the fewest pairs so far (ties: by the group's name), so folds stay balanced even with a
    handful of voters; deterministic.

    Raises:
        ValueError: ``folds`` < 2.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pair in enumerate(pairs):
        voter = pair.get("voter")
        groups[f"voter:{voter}" if voter is not None else f"conversation:{pair['conversation_id']}"].append(i)
    sizes = [0] * folds
    fold_of = [0] * len(pairs)
    for name in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        fold = min(range(folds), key=lambda f: (sizes[f], f))
        sizes[fold] += len(groups[name])
        for i in groups[name]:
            fold_of[i] = fold
    return fold_of


def out_of_voter_judge(base, tokenizer, reward: RewardConfig, folds: int,
                       adapter: str = "reward_judge") -> Callable[[list[dict]], list[bool | None]]:
    """The judge of :func:`clean_votes` with no reward model in use yet (module docstring): each
    pair judged by a fresh reward model trained on the votes of the voters in the other
    :func:`voter_folds` (:func:`training.reward_training.out_of_fold_agreement`, ``reward``'s
    settings). A pair that cannot be encoded (identical answers, both bad) or is a tie: None.

    Raises (from the judge):
        NotEnoughVotesError: fewer than ``reward.min_votes`` usable A/B pairs, or fewer than two
            groups of voters (no one to compare with).
    """

    def judge(pairs: list[dict]) -> list[bool | None]:
        encoded = [encode_pairs(tokenizer, [p], reward.max_length) for p in pairs]  # [] where unusable
        usable = [i for i, e in enumerate(encoded) if e]
        rows = [encoded[i][0] for i in usable]
        decisive = sum(not r["tie"] for r in rows)
        fold_of = voter_folds([pairs[i] for i in usable], folds) if usable else []
        if decisive < reward.min_votes or len(set(fold_of)) < 2:
            raise NotEnoughVotesError(f"{decisive} usable A/B votes in {len(set(fold_of))} folds of voters "
                                      f"(need {reward.min_votes} in 2)")
        agrees, _ = out_of_fold_agreement(base, tokenizer, rows, fold_of, reward, adapter)
        out: list[bool | None] = [None] * len(pairs)
        for i, agree in zip(usable, agrees, strict=True):
            out[i] = agree
        return out

    return judge


def clean_round_votes(pairs: list[dict], config: VoterConfig, base, tokenizer, rm_dir,
                      reward: RewardConfig) -> tuple[list[dict], dict]:
    """:func:`clean_votes` for a round: the judge is the reward model in use, loaded from
    ``rm_dir`` onto ``base`` (the round's peft model) as an adapter of its own and deleted again;
    ``rm_dir`` None (the data dir's first round): :func:`out_of_voter_judge` (too few votes or
    voters for it: caps only)."""
    if config.outlier_alpha == 0:
        return clean_votes(pairs, config, None)
    if rm_dir is None:
        try:
            return clean_votes(pairs, config, out_of_voter_judge(base, tokenizer, reward, config.reference_folds,
                                                                 unused_adapter_name(base, "reward_judge")))
        except NotEnoughVotesError:
            return clean_votes(pairs, config, None)
    rm = RewardModel.load(base, rm_dir, adapter=unused_adapter_name(base, "reward_judge"))
    try:
        return clean_votes(pairs, config, reward_model_judge(rm, tokenizer, reward.max_length))
    finally:
        rm.release()
