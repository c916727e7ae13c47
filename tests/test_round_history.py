"""The plots' data (storage.round_history) on a fixed data dir: rounds and votes written through
the store's own API with known figures, read back as typed frames that Gradio's plots accept."""

from __future__ import annotations

import math
from datetime import datetime

import pandas as pd
import pytest

from storage.round_history import round_history, votes_over_time


def _when(stamp: str) -> pd.Timestamp:
    return pd.Timestamp(datetime.fromisoformat(stamp))


def _round(store, status, metrics=None, version=None, votes_used=0, reason="", live=False, version_status=None):
    """A finished round, and the version it published (when ``version`` is given)."""
    round_id = store.start_round("manual")
    if version is not None:
        store.register_version(version, f"adapters/v{version}", parent=version - 1, round_id=round_id,
                               metrics=metrics, status="live" if live else "candidate")
        if version_status is not None:
            store.set_version_status(version, version_status)
    return store.finish_round(round_id, status, reason=reason, metrics=metrics, version=version,
                              votes_used=votes_used)


@pytest.fixture
def history_store(store):
    """v0 live, then: a promoted round (v1, later retired by v3), a gate-rejected one (v2), a
    skipped and a failed one (no metrics), a promoted one (v3, live), one whose candidate users
    rejected (v4), and one whose candidate waits (v5, no RM accuracy measured)."""
    store.register_version(0, "adapters/v0", status="live")
    rows = [
        _round(store, "succeeded", {"objective/reward": 0.25, "objective/kl": 1.5, "rm/accuracy": 0.6,
                                    "rm/heldout_decisive": 10, "answer/length_tokens": 12.0, "gate/win_rate": 0.7},
               version=1, votes_used=20, live=True),
        _round(store, "rejected", {"objective/reward": -0.5, "objective/kl": 7.25, "rm/accuracy": 0.55,
                                   "rm/heldout_decisive": 20, "answer/length_tokens": 30.0, "gate/win_rate": 0.2},
               version=2, votes_used=30, reason="KL to the reference 7.25 nats exceeds 5.00", version_status="rejected"),
        _round(store, "skipped", reason="too few votes"),
        _round(store, "failed", reason="RuntimeError: boom"),
        _round(store, "succeeded", {"objective/reward": 0.75, "objective/kl": 2.0, "rm/accuracy": 0.8,
                                    "rm/heldout_decisive": 40, "answer/length_tokens": 9.5, "gate/win_rate": 0.9},
               version=3, votes_used=50, live=True),
        _round(store, "succeeded", {"objective/reward": 1.0, "objective/kl": 3.0, "rm/accuracy": 0.7,
                                    "rm/heldout_decisive": 50, "answer/length_tokens": 11.0},
               version=4, votes_used=60),
        _round(store, "succeeded", {"objective/reward": 1.25, "objective/kl": 3.5, "rm/accuracy": float("nan"),
                                    "answer/length_tokens": 8.0, "gate/win_rate": 0.6}, version=5, votes_used=70),
    ]
    assert store.decide_candidate(4, promote=False, note="users preferred live")
    return store, rows


def test_one_row_per_trained_round_with_its_figures_and_outcome(history_store):
    store, rows = history_store
    frame = round_history(store)
    trained = [r for r in rows if r["status"] in ("succeeded", "rejected")]
    assert frame["round"].tolist() == [r["id"] for r in trained]  # oldest first; skipped and failed left out
    assert frame["outcome"].tolist() == ["promoted", "rejected", "promoted", "rejected", "candidate"]
    assert frame["status"].tolist() == ["succeeded", "rejected", "succeeded", "succeeded", "succeeded"]
    assert frame["version"].tolist() == [1, 2, 3, 4, 5]
    assert frame["live"].tolist() == [False, False, True, False, False]
    for column, key in (("reward", "objective/reward"), ("kl", "objective/kl"), ("rm_accuracy", "rm/accuracy"),
                        ("rm_heldout_n", "rm/heldout_decisive"), ("answer_tokens", "answer/length_tokens"),
                        ("gate_win_rate", "gate/win_rate")):
        for got, r in zip(frame[column], trained, strict=True):
            want = r["metrics"].get(key)
            if want is None:  # not measured (or NaN, stored as null)
                assert math.isnan(got), (column, r["id"])
            else:
                assert got == want, (column, r["id"])
    assert frame["votes_used"].tolist() == [20, 30, 50, 60, 70]
    assert frame["reason"].iloc[1].startswith("KL to the reference")
    assert frame["finished_at"].tolist() == [_when(r["finished_at"]) for r in trained]
    assert frame["started_at"].tolist() == [_when(r["started_at"]) for r in trained]


def test_columns_are_typed_for_plots(history_store):
    store, _ = history_store
    frame = round_history(store)
    for column in ("finished_at", "started_at"):
        assert isinstance(frame[column].dtype, pd.DatetimeTZDtype) and str(frame[column].dt.tz) == "UTC"
    for column in ("reward", "kl", "rm_accuracy", "rm_heldout_n", "answer_tokens", "gate_win_rate"):
        assert frame[column].dtype == "float64", column
    assert frame["round"].dtype == "int64" and frame["live"].dtype == bool
    assert pd.api.types.is_string_dtype(frame["outcome"]) and pd.api.types.is_string_dtype(frame["status"])


def test_gradio_plots_take_the_frames(history_store):
    import gradio as gr

    store, _ = history_store
    for component in (gr.LinePlot(x="finished_at", y="reward", color="outcome"),
                      gr.ScatterPlot(x="round", y="kl", color="outcome")):
        data = component.postprocess(round_history(store))
        assert data.datatypes["finished_at"] == "temporal" and data.datatypes["outcome"] == "nominal"
        assert data.datatypes["reward"] == data.datatypes["rm_heldout_n"] == "quantitative"
        assert len(data.data) == 5
    votes = gr.LinePlot(x="time", y="votes", color="kind").postprocess(votes_over_time(store))
    assert votes.datatypes == {"time": "temporal", "kind": "nominal", "votes": "quantitative"}


def test_an_empty_data_dir_gives_empty_typed_frames(store):
    rounds, votes = round_history(store), votes_over_time(store)
    assert rounds.empty and votes.empty
    assert isinstance(rounds["finished_at"].dtype, pd.DatetimeTZDtype) and rounds["kl"].dtype == "float64"
    assert list(votes.columns) == ["time", "kind", "votes"] and isinstance(votes["time"].dtype, pd.DatetimeTZDtype)


def test_votes_over_time_counts_every_kind_cumulatively(store):
    conv = store.new_conversation("s")
    choices = ["a", "tie", "b", "both_bad", "a", None, "tie"]  # None: shown, never voted
    for i, choice in enumerate(choices):
        cid = store.add_comparison(conv, "s", [{"role": "user", "content": f"q{i}"}], f"x{i}", f"y{i}", 0, 0, {}, {})
        if choice is not None:
            store.vote(cid, choice)
    frame = votes_over_time(store)
    voted = store.voted_comparisons()  # oldest vote first
    everything = frame[frame["kind"] == "all"]
    assert everything["votes"].tolist() == [1, 2, 3, 4, 5, 6]
    assert everything["time"].tolist() == [_when(c["voted_at"]) for c in voted]
    assert frame[frame["kind"] == "A/B"]["votes"].tolist() == [1, 2, 3]
    assert frame[frame["kind"] == "tie"]["votes"].tolist() == [1, 2]
    both_bad = frame[frame["kind"] == "both bad"]
    assert both_bad["votes"].tolist() == [1] and both_bad["time"].iloc[0] == _when(voted[3]["voted_at"])
    assert frame["votes"].dtype == "int64" and pd.api.types.is_string_dtype(frame["kind"])
