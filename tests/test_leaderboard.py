"""The version leaderboard (storage.leaderboard) on real SQLite stores: Bradley–Terry ratings
against fits computed here from the raw counts, ties, ignored votes, parents, disconnected
versions, bootstrap intervals, the plot's frame and ``python -m storage leaderboard``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit

from storage.leaderboard import COLUMNS, DEFAULT_RIDGE, leaderboard, leaderboard_frame
from storage.store import open_store

REPO = Path(__file__).resolve().parents[1]
POINTS = 400 / math.log(10)  # rating points per natural log-odds unit
TINY_RIDGE = 1e-9  # the plain MLE, for comparison with fits without a penalty


def play(store, winner: int, loser: int, n: int, choice: str | None = None) -> None:
    """Store ``n`` voted comparisons of ``winner`` against ``loser``, the winner shown as A and
    as B in turn (a vote for its side); with ``choice`` ('tie', 'both_bad') that vote instead."""
    conv = store.new_conversation("voter")
    for i in range(n):
        first = i % 2 == 0
        version_a, version_b = (winner, loser) if first else (loser, winner)
        cid = store.add_comparison(conv, "voter", [{"role": "user", "content": f"q{i}"}],
                                   f"answer {version_a} {i}", f"answer {version_b} {i}",
                                   version_a, version_b, None, None)
        store.vote(cid, choice or ("a" if first else "b"))


def by_version(rows) -> dict[int, dict]:
    return {r["version"]: r for r in rows}


def zermelo_strengths(wins: dict[tuple[int, int], float], versions: list[int]) -> dict[int, float]:
    """The Bradley–Terry MLE by Zermelo's fixed-point iteration (Hunter 2004, eq. 3):
    ``π_i ← W_i / Σ_j N_ij / (π_i + π_j)``; returns ``log(π_i / π_0)`` per version."""
    pi = dict.fromkeys(versions, 1.0)
    for _ in range(5000):
        new = {}
        for i in versions:
            total = sum(w for (x, _), w in wins.items() if x == i)
            denom = sum((wins.get((i, j), 0) + wins.get((j, i), 0)) / (pi[i] + pi[j])
                        for j in versions if j != i)
            new[i] = total / denom
        pi = {i: p / new[versions[0]] for i, p in new.items()}
    return {i: math.log(pi[i]) for i in versions}


# -- the fit ----------------------------------------------------------------------------------


def test_two_versions_rating_gap_is_the_log_odds_of_their_record(store):
    play(store, 1, 0, 30)
    play(store, 0, 1, 10)
    exact = by_version(leaderboard(store, bootstrap=0, ridge=TINY_RIDGE))
    assert exact[0]["rating"] == 1000.0  # the anchor
    assert exact[1]["rating"] - 1000.0 == pytest.approx(400 * math.log10(30 / 10), abs=1e-3)
    assert (exact[1]["wins"], exact[1]["losses"], exact[1]["ties"], exact[1]["votes"]) == (30, 10, 0, 40)
    assert (exact[0]["wins"], exact[0]["losses"], exact[0]["votes"]) == (10, 30, 40)
    shrunk = by_version(leaderboard(store, bootstrap=0))  # the default ridge: a little toward 0
    assert exact[1]["rating"] - 1.0 < shrunk[1]["rating"] < exact[1]["rating"]


def test_ties_count_half_and_both_bad_self_matches_and_unknown_versions_are_ignored(store, tmp_path):
    play(store, 1, 0, 6)
    play(store, 0, 1, 2)
    play(store, 1, 0, 4, choice="tie")
    clean = by_version(leaderboard(store, bootstrap=0, ridge=TINY_RIDGE))
    # 6 wins + 4 half-wins against 2 wins + 4 half-wins
    assert clean[1]["rating"] - 1000.0 == pytest.approx(400 * math.log10(8 / 4), abs=1e-3)
    assert (clean[1]["wins"], clean[1]["losses"], clean[1]["ties"], clean[1]["votes"]) == (6, 2, 4, 12)
    assert (clean[0]["wins"], clean[0]["losses"], clean[0]["ties"], clean[0]["votes"]) == (2, 6, 4, 12)

    play(store, 0, 1, 9, choice="both_bad")
    play(store, 1, 1, 5)  # a version against itself
    play(store, 0, 0, 3, choice="tie")
    conv = store.new_conversation("voter")
    store.add_comparison(conv, "voter", [{"role": "user", "content": "q"}], "x", "y", 0, 1, None, None)  # unvoted
    store.vote(store.add_comparison(conv, "voter", [{"role": "user", "content": "q"}], "x", "y",
                                    None, 1, None, None), "a")  # no version recorded
    assert by_version(leaderboard(store, bootstrap=0, ridge=TINY_RIDGE)) == clean


def test_three_versions_match_an_independent_maximum_likelihood_fit(store):
    record = {(1, 0): 7, (0, 1): 3, (2, 1): 5, (1, 2): 4, (2, 0): 6, (0, 2): 2}
    for (winner, loser), n in record.items():
        play(store, winner, loser, n)
    play(store, 2, 1, 2, choice="tie")
    wins = {pair: float(n) for pair, n in record.items()}
    wins[(2, 1)] += 1.0
    wins[(1, 2)] += 1.0
    expected = zermelo_strengths(wins, [0, 1, 2])
    rows = by_version(leaderboard(store, bootstrap=0, ridge=TINY_RIDGE))
    for v in (0, 1, 2):
        assert rows[v]["rating"] == pytest.approx(1000 + POINTS * expected[v], abs=1e-3)
    assert rows[2]["rating"] > rows[1]["rating"] > rows[0]["rating"]
    order = [r["version"] for r in leaderboard(store, bootstrap=0)]
    assert order == [2, 1, 0]  # best first


def test_a_chain_of_versions_adds_up_its_log_odds(store):
    play(store, 1, 0, 9)
    play(store, 0, 1, 3)
    play(store, 2, 1, 2)
    play(store, 1, 2, 4)
    rows = by_version(leaderboard(store, bootstrap=0, ridge=TINY_RIDGE))
    assert rows[1]["rating"] - rows[0]["rating"] == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert rows[2]["rating"] - rows[1]["rating"] == pytest.approx(400 * math.log10(0.5), abs=1e-3)


def test_a_perfect_record_gets_a_finite_rating_above_a_near_perfect_one(tmp_path):
    ratings = {}
    for wins, losses in ((5, 0), (4, 1)):
        with open_store(tmp_path / f"{wins}-{losses}") as store:
            play(store, 1, 0, wins)
            play(store, 0, 1, losses)
            rows = by_version(leaderboard(store, bootstrap=30))
        assert all(math.isfinite(rows[1][k]) for k in ("rating", "low", "high"))
        ratings[wins] = rows[1]["rating"]
    assert ratings[5] > ratings[4] > 1000 + 400 * math.log10(4) - 5
    # two versions, 5–0: the penalised score equation 5·σ(−θ) = ridge·θ, solved here
    theta = brentq(lambda t: 5 * expit(-t) - DEFAULT_RIDGE * t, 0, 100)
    assert ratings[5] == pytest.approx(1000 + POINTS * theta, abs=1e-3)


# -- per version ------------------------------------------------------------------------------


def test_win_rate_against_the_parent_version(store):
    store.register_version(0, "adapters/v0", status="retired")
    store.register_version(1, "adapters/v1", parent=0, status="retired")
    store.register_version(2, "adapters/v2", parent=1, status="rejected")
    store.register_version(3, "adapters/v3", parent=1, status="live")  # trained after a rollback to 1
    store.register_version(4, "adapters/v4", parent=3, status="candidate")  # not shown yet
    play(store, 1, 0, 3)
    play(store, 0, 1, 1)
    play(store, 1, 0, 1, choice="tie")  # v1 vs v0: (3 + ½) / 5
    play(store, 1, 2, 3)
    play(store, 2, 1, 1)  # v2 vs v1: 1 / 4
    play(store, 2, 0, 6)  # v2 beats v0, its grandparent: not its parent
    play(store, 3, 1, 2, choice="tie")  # v3 vs v1: ½
    play(store, 3, 2, 5)  # v3 beats v2: not its parent
    rows = by_version(leaderboard(store, bootstrap=0))
    assert rows[1]["win_rate_vs_parent"] == pytest.approx(0.7) and rows[1]["parent_votes"] == 5
    assert rows[2]["win_rate_vs_parent"] == pytest.approx(0.25) and rows[2]["parent_votes"] == 4
    assert rows[3]["win_rate_vs_parent"] == pytest.approx(0.5) and rows[3]["parent_votes"] == 2
    assert rows[0]["win_rate_vs_parent"] is None and rows[0]["parent"] is None
    assert [rows[v]["parent"] for v in (1, 2, 3, 4)] == [0, 1, 1, 3]
    assert [rows[v]["status"] for v in range(5)] == ["retired", "retired", "rejected", "live", "candidate"]
    assert rows[2]["votes"] == 4 + 6 + 5 and rows[3]["votes"] == 2 + 5
    assert rows[4] == {**dict.fromkeys(COLUMNS, None), "version": 4, "status": "candidate", "parent": 3,
                       "votes": 0, "wins": 0, "losses": 0, "ties": 0, "parent_votes": 0}
    assert [r["version"] for r in leaderboard(store, bootstrap=0)][-1] == 4  # unrated: last


def test_only_the_live_versions_part_of_the_match_graph_is_rated(store):
    store.register_version(0, "adapters/v0", status="retired")
    store.register_version(1, "adapters/v1", parent=0, status="live")
    store.register_version(2, "adapters/v2", parent=1, status="rejected")
    store.register_version(3, "adapters/v3", parent=2, status="retired")
    play(store, 1, 0, 4)
    play(store, 0, 1, 2)
    play(store, 3, 2, 3)
    play(store, 2, 3, 1)
    rows = by_version(leaderboard(store, bootstrap=20, ridge=TINY_RIDGE))
    assert rows[1]["rating"] - rows[0]["rating"] == pytest.approx(400 * math.log10(2), abs=1e-3)
    for v in (2, 3):
        assert (rows[v]["rating"], rows[v]["low"], rows[v]["high"]) == (None, None, None)
    assert (rows[3]["wins"], rows[3]["losses"], rows[3]["win_rate_vs_parent"]) == (3, 1, 0.75)

    store.set_live(3)  # now 2–3 is the rated part, anchored at its lowest version
    rows = by_version(leaderboard(store, bootstrap=20, ridge=TINY_RIDGE))
    assert rows[2]["rating"] == 1000.0
    assert rows[3]["rating"] - 1000.0 == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert rows[0]["rating"] is None and rows[1]["rating"] is None


def test_no_votes_no_ratings(store):
    assert leaderboard(store) == []
    store.register_version(0, "adapters/v0", status="live")
    (row,) = leaderboard(store)
    assert (row["version"], row["rating"], row["votes"]) == (0, None, 0)
    assert leaderboard_frame([row]).empty


# -- bootstrap intervals ----------------------------------------------------------------------


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_votes(tmp_path):
    widths = {}
    for scale in (1, 4):
        with open_store(tmp_path / f"x{scale}") as store:
            play(store, 1, 0, 10 * scale)
            play(store, 0, 1, 5 * scale)
            play(store, 2, 1, 6 * scale)
            play(store, 1, 2, 6 * scale)
            rows = leaderboard(store, bootstrap=100, seed=3)
            assert leaderboard(store, bootstrap=100, seed=3) == rows  # the seed fixes the resamples
            assert leaderboard(store, bootstrap=100, seed=4) != rows
            no_intervals = by_version(leaderboard(store, bootstrap=0))
        rows = by_version(rows)
        assert (rows[0]["low"], rows[0]["rating"], rows[0]["high"]) == (1000.0, 1000.0, 1000.0)
        for v in (1, 2):
            assert rows[v]["low"] < rows[v]["rating"] < rows[v]["high"]
            assert rows[v]["rating"] == no_intervals[v]["rating"]
            assert no_intervals[v]["low"] is None and no_intervals[v]["high"] is None
        widths[scale] = {v: rows[v]["high"] - rows[v]["low"] for v in (1, 2)}
        with open_store(tmp_path / f"x{scale}") as store:
            wide = by_version(leaderboard(store, bootstrap=100, seed=3, confidence=0.99))
        assert wide[1]["high"] - wide[1]["low"] > widths[scale][1]
    for v in (1, 2):
        assert widths[4][v] < 0.75 * widths[1][v]  # about half: the standard error goes as 1/√n


def test_bootstrap_resample_that_cuts_a_version_off_leaves_it_out_of_that_interval(store):
    play(store, 1, 0, 20)
    play(store, 0, 1, 20)
    play(store, 2, 1, 1)  # one match: absent from about a third of the resamples
    rows = by_version(leaderboard(store, bootstrap=50))
    assert all(math.isfinite(rows[2][k]) for k in ("rating", "low", "high"))
    assert rows[2]["low"] > 1000.0  # never the prior's 1000 of a resample without its match


# -- output -----------------------------------------------------------------------------------


def test_frame_for_a_plot(store):
    play(store, 1, 0, 6)
    play(store, 0, 1, 3)
    store.register_version(5, "adapters/v5", status="candidate")
    rows = leaderboard(store, bootstrap=20)
    frame = leaderboard_frame(rows)
    assert list(frame.columns) == ["version", "rating", "low", "high", "votes"]
    assert frame["version"].tolist() == [0, 1]  # rated only, by version
    rated = by_version(rows)
    for record in frame.to_dict("records"):
        row = rated[record["version"]]
        assert (record["rating"], record["low"], record["high"], record["votes"]) == (
            row["rating"], row["low"], row["high"], row["votes"])
    assert np.isnan(leaderboard_frame(leaderboard(store, bootstrap=0))["low"]).all()


def test_bad_arguments_raise_clear_errors(store):
    for kwargs, message in (({"bootstrap": -1}, "bootstrap"), ({"bootstrap": 2.5}, "bootstrap"),
                            ({"seed": "x"}, "seed"), ({"confidence": 1.0}, "confidence"),
                            ({"ridge": 0.0}, "ridge")):
        with pytest.raises(ValueError, match=message):
            leaderboard(store, **kwargs)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "storage", "leaderboard", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table_and_json(tmp_path):
    data = tmp_path / "data"
    with open_store(data) as store:
        store.register_version(0, "adapters/v0", status="retired")
        store.register_version(1, "adapters/v1", parent=0, status="live")
        store.register_version(2, "adapters/v2", parent=1, status="candidate")
        play(store, 1, 0, 6)
        play(store, 0, 1, 2)
        expected = leaderboard(store, bootstrap=25, seed=1)
    table = run_cli("--data-dir", str(data), "--bootstrap", "25", "--seed", "1")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["version", "status", "parent", "rating"])
    body = [line.split() for line in lines[header + 1:]]
    assert [cells[0] for cells in body] == ["1", "0", "2"]  # best first, the unrated last
    one = by_version(expected)[1]
    assert body[0][:4] == ["1", "live", "0", f"{one['rating']:.0f}"]
    assert f"[{one['low']:.0f}, {one['high']:.0f}]" in lines[header + 1]
    assert "75% of 8" in lines[header + 1]  # 6 of 8 against its parent
    assert body[2][:4] == ["2", "candidate", "1", "-"]

    as_json = run_cli("--data-dir", str(data), "--bootstrap", "25", "--seed", "1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout)
    assert parsed == expected and all(list(row) == list(COLUMNS) for row in parsed)

    bad = run_cli("--data-dir", str(data), "--bootstrap", "-3")
    assert bad.returncode != 0 and "bootstrap" in bad.stderr
    missing = run_cli("--data-dir", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
