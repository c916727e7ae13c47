"""Users gate promotion: a candidate goes live only when the people voting prefer it.

A round whose candidate passes the automatic gate (:mod:`training.gate`, judged by the reward
model) publishes it as a *candidate* (``RoundConfig.user_gate``). While it waits, a share of the
comparisons (``user_gate_share``) shows it against the live version, in random order, each
answer recorded with its version as usual. After each vote on such a comparison
:func:`review_candidate` tallies them from the candidate's side — wins, losses, ties (½ each;
"both bad" votes are not counted: they rank nothing) — and decides with the Wilson score
interval (:func:`training.gate.wilson_interval`) of its win rate ``(wins + ties/2) / n``:

* **promote** when the lower bound is above ½ (users prefer it, with confidence);
* **retire** (status ``rejected``) when the upper bound is below ½ (users prefer live, with
  confidence), or once ``user_gate_max_votes`` votes have not shown a preference for it;
* otherwise wait; nothing is decided before ``user_gate_min_votes`` votes (repeatedly looking
  at a running tally finds a "significant" lead by chance far more often than one look does).

The reward model may be wrong about a candidate in ways users are not, so this is the check
that the live model never gets worse. An admin can decide by hand (the Training tab).

One voter (session) cannot swing it by voting against everyone else: among three or more voters
on the candidate, one whose wins and losses differ from all the others' beyond chance (Fisher's
exact test, two-sided, on the 2×2 table of their decisive votes against the others', with at
least ``user_gate_min_votes`` of them; Bonferroni over the voters tested, family-wise level
``user_gate_outlier_alpha``) and who cast fewer decisive votes than the others together is left
out of the tally (:func:`candidate_tally`) — the test the Chatbot Arena applies to anomalous users
(Chiang et al. 2024), here on the one question a candidate asks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from scipy.stats import fisher_exact, norm

from training.flags import help_field
from training.gate import wilson_interval

log = logging.getLogger(__name__)


@dataclass
class UserGateConfig:
    """The users' promotion rule (flags of ``python app.py``)."""

    user_gate: bool = help_field(
        True, help="a candidate that passes the automatic gate waits for users: it is shown against live in a "
        "share of comparisons and goes live only when they prefer it with confidence (false: it goes live at once)")
    user_gate_share: float = help_field(0.5, help="share of comparisons that show a waiting candidate against live")
    user_gate_confidence: float = help_field(
        0.95, help="one-sided confidence of the Wilson bounds that promote (lower bound > ½) or retire (upper < ½) it")
    user_gate_min_votes: int = help_field(10, help="votes on the candidate before anything is decided")
    user_gate_max_votes: int = help_field(80, help="votes after which a candidate users do not prefer with confidence is retired")
    user_gate_outlier_alpha: float = help_field(
        0.01, help="family-wise level of the test that leaves out a voter whose votes on the candidate differ from "
        "everyone else's beyond chance (0: no test)")

    def __post_init__(self):
        if not 0.0 < self.user_gate_share <= 1.0:
            raise ValueError(f"--user-gate-share must be in (0, 1], got {self.user_gate_share}")
        if not 0.5 < self.user_gate_confidence < 1.0:
            raise ValueError(f"--user-gate-confidence must be in (0.5, 1), got {self.user_gate_confidence}")
        if not 1 <= self.user_gate_min_votes <= self.user_gate_max_votes:
            raise ValueError("--user-gate-min-votes must be >= 1 and at most --user-gate-max-votes, got "
                             f"{self.user_gate_min_votes} and {self.user_gate_max_votes}")
        if not 0.0 <= self.user_gate_outlier_alpha < 1.0:
            raise ValueError(f"--user-gate-outlier-alpha must be in [0, 1), got {self.user_gate_outlier_alpha}")

    @property
    def z(self) -> float:
        """The one-sided z of ``user_gate_confidence``."""
        return float(norm.ppf(self.user_gate_confidence))


@dataclass
class Verdict:
    """Where a candidate stands: its tally, win rate and Wilson bounds, and the decision
    (``"promote"``, ``"retire"`` or ``None``: keep asking) with a sentence for the UI."""

    wins: int
    losses: int
    ties: int
    win_rate: float | None
    low: float
    high: float
    decision: str | None
    note: str
    excluded: tuple[str, ...] = ()  # voters left out of the tally (module docstring)

    @property
    def votes(self) -> int:
        """Votes that rank the two versions (wins, losses and ties)."""
        return self.wins + self.losses + self.ties


def verdict(wins: int, losses: int, ties: int, config: UserGateConfig) -> Verdict:
    """The rule of the module docstring on one tally.

    Raises:
        ValueError: a negative count.
    """
    if min(wins, losses, ties) < 0:
        raise ValueError(f"vote counts must be >= 0, got {wins}, {losses}, {ties}")
    n = wins + losses + ties
    score = wins + 0.5 * ties
    low, high = wilson_interval(score, n, config.z)
    rate = score / n if n else None
    tally = f"{wins} wins, {losses} losses, {ties} ties"
    bounds = f"win rate {rate:.2f}, bounds {low:.2f}–{high:.2f}" if n else "no votes yet"
    if n < config.user_gate_min_votes:
        return Verdict(wins, losses, ties, rate, low, high, None,
                       f"waiting: {tally} ({bounds}); decides after {config.user_gate_min_votes} votes")
    if low > 0.5:
        return Verdict(wins, losses, ties, rate, low, high, "promote", f"users prefer it: {tally} ({bounds})")
    if high < 0.5:
        return Verdict(wins, losses, ties, rate, low, high, "retire", f"users prefer live: {tally} ({bounds})")
    if n >= config.user_gate_max_votes:
        return Verdict(wins, losses, ties, rate, low, high, "retire",
                       f"not preferred after {n} votes (limit {config.user_gate_max_votes}): {tally} ({bounds})")
    return Verdict(wins, losses, ties, rate, low, high, None, f"waiting: {tally} ({bounds})")


def outlier_voters(by_voter: dict[str, dict[str, int]], config: UserGateConfig) -> set[str]:
    """The voters left out of a candidate's tally (module docstring); ``by_voter`` as
    ``Store.candidate_tally`` gives it."""
    if config.user_gate_outlier_alpha <= 0 or len(by_voter) < 3:
        return set()
    wins = sum(t["wins"] for t in by_voter.values())
    losses = sum(t["losses"] for t in by_voter.values())
    tested = [v for v, t in by_voter.items() if t["wins"] + t["losses"] >= config.user_gate_min_votes]
    out = set()
    for voter in tested:
        w, lost = by_voter[voter]["wins"], by_voter[voter]["losses"]
        if w + lost >= (wins - w) + (losses - lost):
            continue  # not a minority: there is no "everyone else" to differ from
        p = fisher_exact([[w, lost], [wins - w, losses - lost]]).pvalue
        if p < config.user_gate_outlier_alpha / len(tested):
            out.add(voter)
    return out


def candidate_verdict(store, version: int, config: UserGateConfig) -> Verdict:
    """:func:`verdict` on ``version``'s votes against other versions (``Store.candidate_tally``),
    outlier voters left out (:func:`outlier_voters`, named in the note)."""
    by_voter = store.candidate_tally(version)
    excluded = outlier_voters(by_voter, config)
    kept = [t for v, t in by_voter.items() if v not in excluded]
    result = verdict(sum(t["wins"] for t in kept), sum(t["losses"] for t in kept), sum(t["ties"] for t in kept), config)
    if excluded:
        n = sum(by_voter[v]["wins"] + by_voter[v]["losses"] + by_voter[v]["ties"] for v in excluded)
        result.note += f"; {len(excluded)} voter(s) left out ({n} votes unlike everyone else's)"
        result.excluded = tuple(sorted(excluded))
    return result


def review_candidate(store, config: UserGateConfig) -> Verdict | None:
    """Decide the waiting candidate if its votes allow (promote: live from the next reply;
    retire: status ``rejected``), through ``Store.decide_candidate``, which settles a candidate
    exactly once however many votes arrive together. Returns its :class:`Verdict`, or None when
    no candidate waits."""
    version = store.candidate_version()
    if version is None:
        return None
    result = candidate_verdict(store, version, config)
    if result.decision is not None and store.decide_candidate(version, result.decision == "promote", result.note):
        log.info("candidate version %s %s: %s", version,
                 "promoted" if result.decision == "promote" else "retired", result.note)
    return result
