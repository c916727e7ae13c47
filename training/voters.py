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
   the reference is one trained on the round's votes themselves (without an ensemble): the
   outlier's own votes pull it their way a little, so the test is weaker there.
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
from dataclasses import dataclass, replace

from scipy.stats import binomtest

from training.flags import help_field
from training.models import unused_adapter_name
from training.reward_model import RewardModel
from training.reward_training import NotEnoughVotesError, RewardConfig, score, train_reward_model

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

    def __post_init__(self):
        if not 0.0 < self.max_share <= 1.0:
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share}")
        if self.min_cap < 1:
            raise ValueError(f"min_cap must be >= 1, got {self.min_cap}")
        if not 0.0 <= self.outlier_alpha < 1.0:
            raise ValueError(f"outlier_alpha must be in [0, 1), got {self.outlier_alpha}")
        if self.outlier_min_votes < 1:
            raise ValueError(f"outlier_min_votes must be >= 1, got {self.outlier_min_votes}")


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


def clean_round_votes(pairs: list[dict], config: VoterConfig, base, tokenizer, rm_dir,
                      reward: RewardConfig) -> tuple[list[dict], dict]:
    """:func:`clean_votes` for a round: the judge is the reward model in use, loaded from
    ``rm_dir`` onto ``base`` (the round's peft model) as an adapter of its own and deleted again;
    ``rm_dir`` None (the data dir's first round): one trained with ``reward``'s settings on
    ``pairs`` (too few of them: caps only)."""
    if config.outlier_alpha == 0:
        return clean_votes(pairs, config, None)
    adapter = unused_adapter_name(base, "reward_judge")
    if rm_dir is not None:
        rm = RewardModel.load(base, rm_dir, adapter=adapter)
    else:
        try:
            rm, _ = train_reward_model(base, tokenizer, pairs, replace(reward, ensemble=replace(reward.ensemble, members=0)),
                                       adapter=adapter)
        except NotEnoughVotesError:
            return clean_votes(pairs, config, None)
    try:
        return clean_votes(pairs, config, reward_model_judge(rm, tokenizer, reward.max_length))
    finally:
        rm.release()
