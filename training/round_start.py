"""Whether a training round can start, judged from the database alone (no model loaded): the
one rule a round's first step (:func:`training.round.load_inputs`) and the app's "Train now"
(:meth:`training.scheduler.TrainingScheduler.request_round`) both answer by."""

from __future__ import annotations

from storage.store import Store


class SkipRound(Exception):
    """The round cannot train (too few votes, no prompts); recorded as skipped with the message."""

    def __init__(self, reason: str, votes: int = 0):
        super().__init__(reason)
        self.votes = votes


def check_startable(store: Store, min_votes: int) -> list[dict]:
    """Whether a round on ``store`` can train, judged from the database alone (no model is
    loaded): the one rule both a round and the app's "Train now" answer by. Returns the votes
    as pairs (``Store.vote_pairs``).

    Raises:
        SkipRound: fewer A/B votes (ties excluded) than ``min_votes``, or no stored
            conversation; its message says which, with the counts.
    """
    pairs = store.vote_pairs()
    n_ab = sum(1 for p in pairs if not p["tie"])
    if n_ab < min_votes:
        raise SkipRound(f"too few votes: {n_ab} A/B votes, {min_votes} needed "
                        "(--min-votes; the app's --round.min-votes)", len(pairs))
    if not store.prompts(limit=1):
        raise SkipRound("no stored conversations to take prompts from", len(pairs))
    return pairs


def skip_reason(store: Store, min_votes: int) -> str | None:
    """:func:`check_startable`'s verdict as text: why a round would be skipped, None if not."""
    try:
        check_startable(store, min_votes)
    except SkipRound as skip:
        return str(skip)
    return None
