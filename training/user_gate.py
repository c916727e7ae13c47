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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from scipy.stats import norm

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

    def __post_init__(self):
        if not 0.0 < self.user_gate_share <= 1.0:
            raise ValueError(f"--user-gate-share must be in (0, 1], got {self.user_gate_share}")
        if not 0.5 < self.user_gate_confidence < 1.0:
            raise ValueError(f"--user-gate-confidence must be in (0.5, 1), got {self.user_gate_confidence}")
        if not 1 <= self.user_gate_min_votes <= self.user_gate_max_votes:
            raise ValueError("--user-gate-min-votes must be >= 1 and at most --user-gate-max-votes, got "
                             f"{self.user_gate_min_votes} and {self.user_gate_max_votes}")

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


def candidate_verdict(store, version: int, config: UserGateConfig) -> Verdict:
    """:func:`verdict` on ``version``'s votes against other versions (``Store.candidate_tally``)."""
    t = store.candidate_tally(version)
    return verdict(t["wins"], t["losses"], t["ties"], config)


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
