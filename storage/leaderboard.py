"""Which policy version users prefer: a Bradley–Terry rating per version from the stored votes.

Every voted comparison between two different versions is a *match* (Chiang et al. 2024,
"Chatbot Arena", §5: maximum-likelihood Bradley–Terry fit with bootstrap intervals, applied
here to policy versions instead of models). A vote for A is a win of ``version_a`` over
``version_b``, a vote for B the reverse, a tie half a win each way; "both bad" votes, unvoted
comparisons, comparisons of a version against itself and rows with an unknown version are no
match. Pairs whose two answers happen to be the same text are kept (the vote is still what
users said about the two versions).

**Model** (Bradley & Terry 1952). Version ``i`` has strength ``θ_i`` (natural log-odds) and
beats ``j`` with probability ``σ(θ_i − θ_j)``. The fit maximises

    Σ_{i,j} W_ij · log σ(θ_i − θ_j)  −  ridge/2 · Σ_i θ_i²

where ``W_ij`` is ``i``'s wins over ``j`` plus half their ties, with the anchor's ``θ`` fixed
at 0. The small ridge (a Gaussian prior of standard deviation ``1/√ridge`` log-odds around the
anchor) keeps the estimate finite when one version won every match (perfect separation, where
the plain MLE runs off to infinity) and makes the objective strictly convex; with the default
``ridge = 0.01`` a version that beat its only opponent 5–0 is rated about 800 points above it.
The optimum is found by ``scipy.optimize.minimize`` (``trust-exact``, analytic gradient and
Hessian).

**Scale** (Elo-like): ``rating = 1000 + 400 · log10(e) · θ``, i.e. a version rated ``D`` points
above another beats it with probability ``1 / (1 + 10^(−D/400))`` (+400 points: 10:1 odds).
The *anchor* is version 0 at exactly :data:`BASE_RATING` (1000) when it is in the rated part;
otherwise the lowest-numbered version there.

**Rated part.** Ratings are comparable only within a connected part of the graph of matches,
so only the connected component that holds the live version (when it played a match; else
version 0's, else the lowest-numbered version's that played) is rated. Versions in other
components, and versions that played no match, get ``rating``, ``low`` and ``high`` None;
their counts are still reported.

**Intervals** (Efron 1979, percentile bootstrap): the rated part's matches are resampled with
replacement ``bootstrap`` times (``numpy.random.default_rng(seed)``) and refitted; a version's
``low``/``high`` are the ``(1 − confidence)/2`` and ``(1 + confidence)/2`` percentiles of its
ratings over the resamples in which it stays connected to the anchor. The anchor's interval is
the point ``[1000, 1000]``: every other interval is relative to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import expit, log_expit

if TYPE_CHECKING:
    import pandas as pd

    from storage.store import Store

BASE_RATING = 1000.0  # the anchor's rating
ELO_PER_LOGIT = 400.0 / math.log(10.0)  # rating points per natural log-odds unit (≈ 173.7)
DEFAULT_RIDGE = 0.01

# keys of every leaderboard row, in the order the command line prints them
COLUMNS = ("version", "status", "parent", "rating", "low", "high", "votes", "wins", "losses",
           "ties", "parent_votes", "win_rate_vs_parent")


def matches(store: Store) -> list[tuple[int, int, float]]:
    """The stored matches as ``(version_a, version_b, score_a)``, oldest vote first:
    ``score_a`` is 1.0 (A won), 0.0 (B won) or 0.5 (tie). "Both bad" votes, unvoted
    comparisons, self-matches and rows with a NULL version are left out."""
    rows = store.db.execute(
        "SELECT version_a, version_b, choice FROM comparisons "
        "WHERE choice IN ('a', 'b', 'tie') AND version_a IS NOT NULL AND version_b IS NOT NULL "
        "AND version_a != version_b ORDER BY voted_at, id"
    )
    score = {"a": 1.0, "b": 0.0, "tie": 0.5}
    return [(int(a), int(b), score[choice]) for a, b, choice in rows]


def fit_bradley_terry(wins: np.ndarray, anchor: int, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Penalised maximum-likelihood Bradley–Terry strengths (natural log-odds, the anchor's 0).

    ``wins``: ``(k, k)`` array, ``wins[i, j]`` = wins of ``i`` over ``j`` (ties as ½ each way;
    diagonal ignored). ``anchor``: the index held at 0. ``ridge``: the L2 penalty (> 0) of the
    module docstring. Returns a ``(k,)`` float array; an index that played no match gets 0
    (the prior). Raises ``ValueError`` for a non-square or negative ``wins``, a bad anchor or
    ``ridge <= 0``; ``RuntimeError`` if the optimiser fails (not expected: the objective is
    strictly convex).
    """
    wins = np.array(wins, dtype=float)
    if wins.ndim != 2 or wins.shape[0] != wins.shape[1]:
        raise ValueError(f"wins must be a square (k, k) array; got shape {wins.shape}")
    if not np.all(np.isfinite(wins)) or np.any(wins < 0):
        raise ValueError("wins must be finite and >= 0")
    k = wins.shape[0]
    if not 0 <= anchor < k:
        raise ValueError(f"anchor must be an index in [0, {k}); got {anchor}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (it keeps a perfect record finite); got {ridge}")
    np.fill_diagonal(wins, 0.0)
    free = np.array([i for i in range(k) if i != anchor], dtype=int)
    if free.size == 0:
        return np.zeros(k)
    games = wins + wins.T

    def full(x: np.ndarray) -> np.ndarray:
        theta = np.zeros(k)
        theta[free] = x
        return theta

    def objective(x: np.ndarray) -> float:
        theta = full(x)
        diff = theta[:, None] - theta[None, :]
        return float(-(wins * log_expit(diff)).sum() + 0.5 * ridge * (x @ x))

    def gradient(x: np.ndarray) -> np.ndarray:
        theta = full(x)
        resid = wins * expit(-(theta[:, None] - theta[None, :]))  # W_ij (1 − p_ij)
        g = -(resid.sum(axis=1) - resid.sum(axis=0))
        return g[free] + ridge * x

    def hessian(x: np.ndarray) -> np.ndarray:
        theta = full(x)
        p = expit(theta[:, None] - theta[None, :])
        info = games * p * (1.0 - p)
        h = np.diag(info.sum(axis=1)) - info
        return h[np.ix_(free, free)] + ridge * np.eye(free.size)

    result = minimize(objective, np.zeros(free.size), jac=gradient, hess=hessian,
                      method="trust-exact", options={"gtol": 1e-9})
    if not np.all(np.isfinite(result.x)) or np.max(np.abs(gradient(result.x)), initial=0) > 1e-5:
        raise RuntimeError(f"Bradley–Terry fit did not converge: {result.message}")
    return full(result.x)


def _wins_matrix(a: np.ndarray, b: np.ndarray, score: np.ndarray, weight: np.ndarray,
                 k: int) -> np.ndarray:
    """``(k, k)`` wins (ties ½) from match arrays of indices ``a``, ``b``, A's ``score`` and a
    multiplicity ``weight`` per match."""
    wins = np.zeros((k, k))
    np.add.at(wins, (a, b), weight * score)
    np.add.at(wins, (b, a), weight * (1.0 - score))
    return wins


def _connected_to(anchor: int, wins: np.ndarray) -> np.ndarray:
    """Boolean ``(k,)`` mask of the indices in ``anchor``'s component of the match graph."""
    _, labels = connected_components(csr_matrix((wins + wins.T) > 0), directed=False)
    return labels == labels[anchor]


def leaderboard(
    store: Store,
    bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    ridge: float = DEFAULT_RIDGE,
) -> list[dict[str, Any]]:
    """The version leaderboard from every stored vote (method and scale: the module docstring).

    ``bootstrap``: resamples for the intervals (0: no intervals, ``low``/``high`` None);
    ``seed``: their random generator's seed (same seed and votes → same result);
    ``confidence``: the interval's coverage in (0, 1); ``ridge``: the fit's L2 penalty (> 0).

    Returns one dict per version — every registered version and every version named in a vote
    — best rating first, unrated versions after them by version number:

    - ``version`` (int); ``status`` (``live``/``candidate``/``rejected``/``retired``, None if
      not registered); ``parent`` (the version it was trained from, None for none/unknown);
    - ``rating``, ``low``, ``high``: Elo-like rating and its bootstrap interval (float, rating
      points); None outside the rated part or with no match;
    - ``votes``: matches it played (int); ``wins``, ``losses``, ``ties`` (int);
    - ``parent_votes``: matches against its parent (int); ``win_rate_vs_parent``: its wins +
      ½ ties over those matches (float in [0, 1]), None when it has none.

    Raises ``ValueError`` for ``bootstrap < 0``, a non-int ``bootstrap``/``seed``, a
    ``confidence`` outside (0, 1) or ``ridge <= 0``.
    """
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an int >= 0 (resamples); got {bootstrap!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0; got {ridge!r}")

    played = matches(store)
    registered = {r["version"]: r for r in store.versions()}
    versions = sorted(set(registered) | {v for a, b, _ in played for v in (a, b)})
    index = {v: i for i, v in enumerate(versions)}
    k = len(versions)

    rows = {v: {"version": v, "status": registered.get(v, {}).get("status"),
                "parent": registered.get(v, {}).get("parent"), "rating": None, "low": None,
                "high": None, "votes": 0, "wins": 0, "losses": 0, "ties": 0,
                "parent_votes": 0, "win_rate_vs_parent": None} for v in versions}
    vs_parent = dict.fromkeys(versions, 0.0)  # points (wins + ½ ties) against the parent
    for a, b, s in played:
        for me, other, mine in ((a, b, s), (b, a, 1.0 - s)):
            row = rows[me]
            row["votes"] += 1
            row["wins" if mine == 1.0 else "losses" if mine == 0.0 else "ties"] += 1
            if row["parent"] is not None and other == row["parent"]:
                row["parent_votes"] += 1
                vs_parent[me] += mine
    for v, row in rows.items():
        if row["parent_votes"]:
            row["win_rate_vs_parent"] = vs_parent[v] / row["parent_votes"]

    if played:
        a = np.array([index[m[0]] for m in played])
        b = np.array([index[m[1]] for m in played])
        score = np.array([m[2] for m in played])
        wins = _wins_matrix(a, b, score, np.ones(len(played)), k)
        live = store.live_version()
        seeds = [live, 0, min(v for m in played for v in m[:2])]
        start = next(v for v in seeds if v is not None and rows.get(v, {}).get("votes"))
        rated = _connected_to(index[start], wins)
        anchor = index[0] if 0 in index and rated[index[0]] else int(np.flatnonzero(rated)[0])
        theta = fit_bradley_terry(wins, anchor, ridge)
        for i in np.flatnonzero(rated):
            rows[versions[i]]["rating"] = BASE_RATING + ELO_PER_LOGIT * float(theta[i])

        if bootstrap:
            keep = rated[a]  # the rated part's matches (a match's two versions share a part)
            a, b, score = a[keep], b[keep], score[keep]
            rng = np.random.default_rng(seed)
            draws = np.full((bootstrap, k), np.nan)
            for r in range(bootstrap):
                weight = np.bincount(rng.integers(0, len(a), len(a)), minlength=len(a))
                resampled = _wins_matrix(a, b, score, weight.astype(float), k)
                inside = _connected_to(anchor, resampled)
                draws[r, inside] = BASE_RATING + ELO_PER_LOGIT * fit_bradley_terry(
                    resampled, anchor, ridge)[inside]
            tail = 50.0 * (1.0 - confidence)
            for i in np.flatnonzero(rated):
                column = draws[:, i][~np.isnan(draws[:, i])]
                if column.size:
                    low, high = np.percentile(column, [tail, 100.0 - tail])
                    rows[versions[i]]["low"], rows[versions[i]]["high"] = float(low), float(high)

    return sorted(rows.values(), key=lambda r: (r["rating"] is None, -(r["rating"] or 0.0), r["version"]))


def leaderboard_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The rated rows of :func:`leaderboard` as a ``pandas.DataFrame`` for a plot: columns
    ``version`` (int), ``rating``, ``low``, ``high`` (float rating points; ``low``/``high``
    NaN without bootstrap), ``votes`` (int); one row per rated version, by version number."""
    import pandas as pd

    rated = sorted((r for r in rows if r["rating"] is not None), key=lambda r: r["version"])
    return pd.DataFrame({
        "version": pd.Series([r["version"] for r in rated], dtype="int64"),
        "rating": pd.Series([r["rating"] for r in rated], dtype="float64"),
        "low": pd.Series([np.nan if r["low"] is None else r["low"] for r in rated], dtype="float64"),
        "high": pd.Series([np.nan if r["high"] is None else r["high"] for r in rated], dtype="float64"),
        "votes": pd.Series([r["votes"] for r in rated], dtype="int64"),
    })


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`leaderboard` rows as a plain-text table (ratings rounded to whole points, the win
    rate against the parent as a percentage; ``-`` for None)."""
    import pandas as pd

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    frame = pd.DataFrame([{
        "version": r["version"],
        "status": r["status"] or "-",
        "parent": "-" if r["parent"] is None else r["parent"],
        "rating": num(r["rating"], ".0f"),
        "interval": "-" if r["low"] is None else f"[{r['low']:.0f}, {r['high']:.0f}]",
        "votes": r["votes"], "wins": r["wins"], "losses": r["losses"], "ties": r["ties"],
        "vs parent": "-" if r["win_rate_vs_parent"] is None
        else f"{100 * r['win_rate_vs_parent']:.0f}% of {r['parent_votes']}",
    } for r in rows])
    if frame.empty:
        return "no versions yet"
    return frame.to_string(index=False)
