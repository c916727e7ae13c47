"""The rounds and the votes over time, as data frames for plots (the Training tab's).

:func:`round_history` has one row per round that trained (status ``'succeeded'`` or
``'rejected'``: :data:`storage.rounds.TRAINED_STATUSES`), oldest first, with its figures and an
``outcome`` label for colour; :func:`votes_over_time` the cumulative count of votes, overall and
by kind. Skipped and failed rounds are left out: they train nothing and record no metrics (a
round that fails is recorded with its reason only).

Column types are what ``gr.LinePlot`` / ``gr.ScatterPlot`` read: times ``datetime64[…, UTC]``
(temporal), figures ``float64`` (quantitative, NaN where a round did not measure one), labels
``str`` (nominal, e.g. ``color="outcome"``).
"""

from __future__ import annotations

import pandas as pd

from storage.rounds import TRAINED_STATUSES
from storage.store import Store

# column → the metric key of the round's row it comes from (see training.ppo / reward_training / gate)
ROUND_METRICS = {
    "reward": "objective/reward",          # mean raw reward-model score of PPO's answers
    "kl": "objective/kl",                  # mean KL per answer to the reference, nats
    "rm_accuracy": "rm/accuracy",          # reward model's held-out pairwise accuracy (ties excluded)
    "rm_heldout_n": "rm/heldout_decisive",  # how many held-out A/B votes that accuracy is over
    "answer_tokens": "answer/length_tokens",  # mean tokens per PPO rollout answer
    "gate_win_rate": "gate/win_rate",      # the candidate's RM-judged win rate vs live (NaN: no gate)
}
OUTCOMES = ("promoted", "candidate", "rejected")
ROUND_COLUMNS = ("round", "started_at", "finished_at", "status", "outcome", "version", "live",
                 *ROUND_METRICS, "votes_used", "reason")
VOTE_KINDS = {"a": "A/B", "b": "A/B", "tie": "tie", "both_bad": "both bad"}  # choice → kind; plus "all"


def _times(values) -> pd.Series:
    """ISO-8601 strings (None allowed) → ``datetime64[…, UTC]``."""
    return pd.to_datetime(pd.Series(list(values), dtype="object"), utc=True, format="ISO8601")


def _figure(value) -> float:
    """A stored metric as a float (NaN for missing, null or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


def _outcome(round_status: str, version_row: dict | None) -> str:
    """``'promoted'`` (the version went live: it is live or was retired after serving),
    ``'candidate'`` (waiting for users' votes) or ``'rejected'`` (by the gate, or afterwards by
    users, an admin, a newer candidate or a damaged-files check: the version's ``note`` says)."""
    if round_status == "rejected":
        return "rejected"
    if version_row is None:  # a round that succeeded before versions recorded otherwise went live
        return "promoted"
    status = version_row["status"]
    if status in ("live", "retired"):
        return "promoted"
    return "candidate" if status == "candidate" else "rejected"


def round_history(store: Store) -> pd.DataFrame:
    """One row per round that trained (``'succeeded'`` or ``'rejected'``), oldest first.

    Columns: ``round`` (id, int64), ``started_at`` and ``finished_at`` (datetime, UTC),
    ``status`` (the round's), ``outcome`` (str: ``'promoted'``, ``'candidate'`` or
    ``'rejected'``, from the round's status and its version's current one: see
    :data:`OUTCOMES`), ``version`` (the version it published, Int64, <NA> if none), ``live``
    (bool: that version serves now), the :data:`ROUND_METRICS` figures as float64 —
    ``reward``, ``kl`` (nats), ``rm_accuracy`` and its ``rm_heldout_n``, ``answer_tokens``,
    ``gate_win_rate`` — ``votes_used`` (int64) and ``reason`` (str). No rounds: an empty frame
    with these columns and types.
    """
    versions = {v["version"]: v for v in store.versions()}
    live = store.live_version()
    rounds = sorted((r for r in store.rounds(limit=None) if r["status"] in TRAINED_STATUSES), key=lambda r: r["id"])
    columns: dict[str, list] = {c: [] for c in ROUND_COLUMNS}
    for r in rounds:
        metrics = r.get("metrics") or {}
        version = r.get("version")
        columns["round"].append(int(r["id"]))
        columns["started_at"].append(r.get("started_at"))
        columns["finished_at"].append(r.get("finished_at"))
        columns["status"].append(r["status"])
        columns["outcome"].append(_outcome(r["status"], versions.get(version)))
        columns["version"].append(version)
        columns["live"].append(version is not None and version == live)
        for column, key in ROUND_METRICS.items():
            columns[column].append(_figure(metrics.get(key)))
        columns["votes_used"].append(int(r.get("votes_used") or 0))
        columns["reason"].append(r.get("reason") or "")
    frame = pd.DataFrame({
        "round": pd.Series(columns["round"], dtype="int64"),
        "started_at": _times(columns["started_at"]),
        "finished_at": _times(columns["finished_at"]),
        "status": pd.Series(columns["status"], dtype="str"),
        "outcome": pd.Series(columns["outcome"], dtype="str"),
        "version": pd.Series(columns["version"], dtype="Int64"),
        "live": pd.Series(columns["live"], dtype="bool"),
        **{c: pd.Series(columns[c], dtype="float64") for c in ROUND_METRICS},
        "votes_used": pd.Series(columns["votes_used"], dtype="int64"),
        "reason": pd.Series(columns["reason"], dtype="str"),
    })
    return frame


def votes_over_time(store: Store) -> pd.DataFrame:
    """The cumulative number of votes at each vote, in long form for one line per kind
    (``gr.LinePlot(x="time", y="votes", color="kind")``): for every vote, oldest first, a row
    of kind ``'all'`` and one of its own kind (:data:`VOTE_KINDS`: ``'A/B'``, ``'tie'``,
    ``'both bad'``), each with the count of that kind so far, that vote included.

    Columns: ``time`` (datetime, UTC; when the vote was cast), ``kind`` (str), ``votes``
    (int64). No votes: an empty frame with these columns and types.
    """
    rows = store.db.execute(
        "SELECT voted_at, choice FROM comparisons WHERE choice IS NOT NULL ORDER BY voted_at, id"
    ).fetchall()
    times, kinds, counts = [], [], []
    seen: dict[str, int] = {}
    for voted_at, choice in rows:
        for kind in ("all", VOTE_KINDS[choice]):
            seen[kind] = seen.get(kind, 0) + 1
            times.append(voted_at)
            kinds.append(kind)
            counts.append(seen[kind])
    return pd.DataFrame({
        "time": _times(times),
        "kind": pd.Series(kinds, dtype="str"),
        "votes": pd.Series(counts, dtype="int64"),
    })
