"""Storage layer on real SQLite files: schema, text fidelity, votes under concurrency,
training data formats, rounds, the policy registry, adapter publishing and the CLI."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from storage.errors import (
    AlreadyVoted,
    RoundAlreadyRunning,
    UnknownComparison,
    UnknownConversation,
    UnknownRound,
)
from storage.migrations import MIGRATIONS
from storage.store import Store, open_store, to_trl

REPO = Path(__file__).resolve().parents[1]

HOSTILE = {
    "html_js": '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;&lt;',
    "emoji": "👩‍👩‍👧‍👦 🏳️‍🌈 ✨ \U0001f600 — “quotes” ½",
    "rtl": "مرحبا بالعالم \u202eevil\u202c שלום עולם",
    "sql": "'; DROP TABLE messages; --",
    "whitespace": "  leading\r\n\ttabs\n\n trailing  ",
    "nul": "before\x00after",
    "big": "x" * 50_000 + "ü" * 25_000 + "🙂" * 5_000,  # > 100 KB of UTF-8
}


def comparison(store: Store, answer_a="Paris.", answer_b="Lyon.", context=None) -> str:
    conv = store.new_conversation("session-1")
    context = context or [{"role": "user", "content": "Capital of France?"}]
    return store.add_comparison(
        conv, "session-1", context, answer_a, answer_b, 0, 1, {"temperature": 0.7}, {"top_p": 0.9}
    )


# -- schema ---------------------------------------------------------------------------------


def test_migrations_idempotent_and_data_survives_reopen(tmp_path):
    path = tmp_path / "nested" / "dir" / "chat.db"
    first = Store(path)
    conv = first.new_conversation("s")
    first.close()
    second = Store(path)  # runs migrate() again: must apply nothing
    rows = list(second.db.query("SELECT version, name FROM schema_migrations ORDER BY version"))
    assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    assert second.schema_version() == len(MIGRATIONS)
    assert second.conversation(conv)["session_id"] == "s"
    second.close()


def test_database_from_before_round_settings_is_upgraded_in_place(tmp_path, monkeypatch):
    import storage.migrations as migrations

    path = tmp_path / "chat.db"
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:2])  # the schema before settings
    with Store(path) as old:  # a round row as the old code wrote it
        assert "settings" not in old.db["training_rounds"].columns_dict
        old.db["training_rounds"].insert({
            "trigger": "manual", "status": "succeeded", "reason": "", "metrics": '{"objective/kl": 0.5}',
            "version": None, "votes_used": 3, "started_at": "2026-01-01T00:00:00Z", "finished_at": None})
    monkeypatch.undo()
    with Store(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        before = store.rounds()[0]
        assert before["settings"] is None and before["metrics"] == {"objective/kl": 0.5}
        rid = store.start_round("manual", settings={"ppo": {"steps": 3}})
        assert store.round(rid)["settings"] == {"ppo": {"steps": 3}}


def test_failed_migration_rolls_back_whole(tmp_path, monkeypatch):
    import storage.migrations as migrations

    path = tmp_path / "chat.db"
    Store(path).close()

    def m_broken(db):
        db.create_table("half_done", {"id": int}, pk="id")
        raise RuntimeError("boom")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*MIGRATIONS, m_broken])
    with pytest.raises(RuntimeError, match="boom"):
        Store(path)
    monkeypatch.undo()
    store = Store(path)
    assert "half_done" not in store.db.table_names()
    assert store.schema_version() == len(MIGRATIONS)
    store.close()


def test_pragmas_on_every_thread(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    seen = {}

    def probe():
        db = store.db
        seen["fk"] = db.execute("PRAGMA foreign_keys").fetchone()[0]
        seen["busy"] = db.execute("PRAGMA busy_timeout").fetchone()[0]
        seen["same_conn"] = db is store.db

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen == {"fk": 1, "busy": 30_000, "same_conn": True}


def test_memory_database_refused():
    with pytest.raises(ValueError, match="memory"):
        Store(":memory:")


def test_one_live_version_enforced_by_schema(store):
    store.register_version(0, "/a", status="live")
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute(
            "INSERT INTO policy_versions (version, path, status, created_at) "
            "VALUES (1, '/b', 'live', 'x')"
        )


# -- conversations and text fidelity ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_round_trips_exactly(store, name):
    text = HOSTILE[name]
    conv = store.new_conversation("sess", system_prompt=text)
    store.add_message(conv, "user", text)
    store.add_message(conv, "assistant", text, policy_version=3, sampling={"note": text})
    msgs = store.messages(conv)
    assert [m["content"] for m in msgs] == [text, text]
    assert msgs[1]["sampling"] == {"note": text}
    assert store.conversation(conv)["system_prompt"] == text
    cid = store.add_comparison(conv, "sess", [{"role": "user", "content": text}], text, text + "!",
                               3, 4, {"k": text}, None)
    row = store.comparison(cid)
    assert (row["answer_a"], row["answer_b"]) == (text, text + "!")
    assert row["context"] == [{"role": "user", "content": text}]
    assert row["sampling_a"] == {"k": text} and row["sampling_b"] is None
    assert store.db.table("messages").count == 2  # the SQL-looking text dropped nothing


def test_messages_ordered_with_fields_and_utc_timestamps(store):
    conv = store.new_conversation("s")
    ids = [store.add_message(conv, role, f"m{i}") for i, role in
           enumerate(["system", "user", "assistant", "user"])]
    assert ids == sorted(ids)
    msgs = store.messages(conv)
    assert [m["content"] for m in msgs] == ["m0", "m1", "m2", "m3"]
    assert set(msgs[0]) >= {"id", "role", "content", "policy_version", "created_at"}
    stamps = [datetime.fromisoformat(m["created_at"]) for m in msgs]
    assert all(t.utcoffset().total_seconds() == 0 for t in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == 4


def test_unknown_ids_and_bad_input_raise_clear_errors(store):
    with pytest.raises(UnknownConversation, match="new_conversation"):
        store.add_message("nope", "user", "hi")
    with pytest.raises(UnknownConversation):
        store.messages("nope")
    with pytest.raises(ValueError, match="role"):
        store.add_message(store.new_conversation("s"), "robot", "hi")
    with pytest.raises(ValueError, match=r"context\[0\]"):
        store.add_comparison(store.new_conversation("s"), "s", [{"role": "user"}], "a", "b",
                             0, 0, None, None)
    with pytest.raises(UnknownComparison, match="no comparison") as err:
        store.comparison("missing")
    assert isinstance(err.value, KeyError) and str(err.value).startswith("no comparison")


# -- votes -----------------------------------------------------------------------------------


def test_second_vote_rejected_and_first_kept(store):
    cid = comparison(store)
    first = store.vote(cid, "a")
    assert first["choice"] == "a" and first["voted_at"]
    with pytest.raises(AlreadyVoted, match="first vote is kept"):
        store.vote(cid, "b")
    again = store.comparison(cid)
    assert (again["choice"], again["voted_at"]) == ("a", first["voted_at"])
    with pytest.raises(ValueError, match="'a', 'b', 'tie', 'both_bad'"):
        store.vote(comparison(store), "A")
    with pytest.raises(UnknownComparison):
        store.vote("missing", "a")


def test_concurrent_votes_on_distinct_comparisons_all_stored(store):
    n_threads, per_thread = 20, 10
    ids = [[comparison(store, f"a{t}-{i}", f"b{t}-{i}") for i in range(per_thread)]
           for t in range(n_threads)]
    barrier, errors = threading.Barrier(n_threads), []

    def voter(mine):
        try:
            barrier.wait()
            for i, cid in enumerate(mine):
                store.vote(cid, "ab"[i % 2])
        except Exception as e:  # reported below, not swallowed
            errors.append(e)

    threads = [threading.Thread(target=voter, args=(mine,)) for mine in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    counts = store.vote_counts()
    assert counts["total"] == n_threads * per_thread and counts["pending"] == 0
    assert counts["a"] == counts["b"] == n_threads * per_thread // 2


def test_racing_votes_on_one_comparison_exactly_one_wins(store):
    for _ in range(10):
        cid = comparison(store)
        barrier, outcomes = threading.Barrier(2), []

        def voter(choice, cid=cid, barrier=barrier, outcomes=outcomes):
            barrier.wait()
            try:
                outcomes.append(("won", store.vote(cid, choice)["choice"]))
            except AlreadyVoted:
                outcomes.append(("lost", choice))

        threads = [threading.Thread(target=voter, args=(c,)) for c in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [c for kind, c in outcomes if kind == "won"]
        assert len(outcomes) == 2 and len(winners) == 1
        assert store.comparison(cid)["choice"] == winners[0]


def test_vote_counts_and_voted_comparisons_after(store):
    cids = [comparison(store) for _ in range(5)]
    store.vote(cids[0], "a")
    store.vote(cids[1], "tie")
    middle = store.comparison(cids[1])["voted_at"]
    store.vote(cids[2], "both_bad")
    store.vote(cids[3], "b")
    assert store.vote_counts() == {"a": 1, "b": 1, "tie": 1, "both_bad": 1, "total": 4,
                                   "pending": 1}
    assert [c["id"] for c in store.voted_comparisons()] == cids[:4]
    later = store.voted_comparisons(after=middle)
    assert [c["id"] for c in later] == cids[2:4]
    assert later[0]["context"] == [{"role": "user", "content": "Capital of France?"}]
    # same instant written as 'Z' selects the same rows
    z = datetime.fromisoformat(middle).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert [c["id"] for c in store.voted_comparisons(after=z)] == cids[2:4]
    with pytest.raises(ValueError, match="ISO-8601"):
        store.voted_comparisons(after="yesterday")


# -- training data ---------------------------------------------------------------------------


def test_vote_pairs_format_and_exclusions(store):
    ctx = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    first = comparison(store, "4", "5", ctx)
    store.vote(first, "a")
    store.vote(comparison(store, "five", "four", ctx), "b")
    tie = comparison(store, "x", "y", ctx)
    store.vote(tie, "tie")
    store.vote(comparison(store, "x", "y", ctx), "both_bad")
    store.vote(comparison(store, "same", " same\n", ctx), "a")  # the same text: nothing to learn
    comparison(store, "unvoted", "other", ctx)
    pairs = store.vote_pairs()
    assert [(p["chosen"], p["rejected"], p["tie"]) for p in pairs] == [("4", "5", False), ("four", "five", False),
                                                                      ("x", "y", True)]
    assert all(p["prompt"] == ctx for p in pairs)
    assert (pairs[0]["chosen_version"], pairs[0]["rejected_version"]) == (0, 1)  # A came from v0, B from v1
    assert (pairs[1]["chosen_version"], pairs[1]["rejected_version"]) == (1, 0)  # B won
    assert pairs[0]["comparison_id"] == first and pairs[2]["comparison_id"] == tie
    assert pairs[0]["conversation_id"] == store.comparison(first)["conversation_id"]
    assert to_trl(pairs[1]) == {
        "prompt": ctx, "chosen": [{"role": "assistant", "content": "four"}],
        "rejected": [{"role": "assistant", "content": "five"}], "tie": False,
        "conversation_id": pairs[1]["conversation_id"]}


def test_export_jsonl_to_path_and_fileobj(store, tmp_path):
    for i in range(3):
        store.vote(comparison(store, f"ünï {i} 🙂", f"other {i}"), "ab"[i % 2])
    store.vote(comparison(store), "tie")
    store.vote(comparison(store), "both_bad")
    out = tmp_path / "exports" / "votes.jsonl"
    assert store.export_jsonl(out) == 4
    text = out.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) == 4 and "🙂" in text and "\\u" not in text
    assert [json.loads(line) for line in lines] == [to_trl(p) for p in store.vote_pairs()]
    assert [json.loads(line)["tie"] for line in lines] == [False, False, False, True]
    buf = io.StringIO()
    assert store.export_jsonl(buf) == 4 and buf.getvalue() == text
    assert [p.name for p in out.parent.iterdir()] == ["votes.jsonl"]  # no temp file left


def test_prompts_history_order_dedup_and_limit(store):
    old = store.new_conversation("s", system_prompt="You are terse.")
    store.add_message(old, "user", "hi")
    store.add_message(old, "assistant", "hello")
    store.add_message(old, "user", "bye")
    dup = store.new_conversation("s2", system_prompt="You are terse.")
    store.add_message(dup, "user", "hi")  # same sequence as old's first prompt
    plain = store.new_conversation("s3")
    store.add_message(plain, "user", "newest")
    prompts = store.prompts()
    assert prompts == [
        {"conversation_id": plain, "messages": [{"role": "user", "content": "newest"}]},
        {"conversation_id": dup, "messages": [{"role": "system", "content": "You are terse."},
                                              {"role": "user", "content": "hi"}]},
        {"conversation_id": old, "messages": [{"role": "system", "content": "You are terse."},
                                              {"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"},
                                              {"role": "user", "content": "bye"}]},
    ]
    assert store.prompts(limit=2) == prompts[:2]


# -- rounds ----------------------------------------------------------------------------------


def test_rounds_lifecycle(store):
    assert store.running_round() is None and store.rounds() == []
    r1 = store.start_round("schedule")
    assert store.running_round()["id"] == r1
    with pytest.raises(RoundAlreadyRunning, match="fail_stale_rounds"):
        store.start_round("manual")
    with pytest.raises(ValueError, match="succeeded"):
        store.finish_round(r1, "done")
    done = store.finish_round(r1, "succeeded", "ok", {"objective/kl": 0.1}, version=1,
                              votes_used=7)
    assert (done["status"], done["metrics"], done["version"], done["votes_used"]) == (
        "succeeded", {"objective/kl": 0.1}, 1, 7)
    assert done["finished_at"] > done["started_at"]
    with pytest.raises(ValueError, match="already finished"):
        store.finish_round(r1, "failed")
    assert done["settings"] is None  # started without settings
    r2 = store.start_round("manual", settings={"lr": 1e-3, "name": "é", "bad": float("nan")})
    assert store.running_round()["settings"] == {"lr": 1e-3, "name": "é", "bad": None}
    assert [r["id"] for r in store.rounds()] == [r2, r1]
    assert [r["id"] for r in store.rounds(limit=1)] == [r2]
    assert store.fail_stale_rounds("crashed") == 1
    assert store.round(r2)["status"] == "failed" and store.round(r2)["reason"] == "crashed"
    assert store.running_round() is None and store.fail_stale_rounds("again") == 0
    with pytest.raises(UnknownRound):
        store.round(999)


def test_metrics_that_json_cannot_hold_are_stored_as_null(store):
    rid = store.start_round("manual")
    store.finish_round(rid, "succeeded", metrics={"rm/accuracy": float("nan"), "x": [float("inf"), 1.5]})
    raw = store.db.execute("select metrics from training_rounds where id = ?", [rid]).fetchone()[0]
    strict = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} stored"))
    assert strict == {"rm/accuracy": None, "x": [None, 1.5]}
    assert store.round(rid)["metrics"]["rm/accuracy"] is None


def test_new_votes_since_last_round(store):
    for _ in range(3):
        store.vote(comparison(store), "a")
    assert store.new_votes_since_last_round() == 3  # no round yet: all votes
    r = store.start_round("schedule")
    store.finish_round(r, "skipped", "not enough votes")
    assert store.new_votes_since_last_round() == 3  # a skipped round trained nothing
    r = store.start_round("schedule")
    store.vote(comparison(store), "tie")  # cast while the round runs: after its start
    store.finish_round(r, "succeeded")
    assert store.new_votes_since_last_round() == 1
    store.vote(comparison(store), "b")
    r = store.start_round("manual")
    store.finish_round(r, "failed", "oom")
    assert store.new_votes_since_last_round() == 2
    r = store.start_round("manual")
    store.finish_round(r, "rejected", "candidate lost the gate")
    assert store.new_votes_since_last_round() == 0


# -- command line ----------------------------------------------------------------------------


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "storage", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_export_and_stats(tmp_path):
    data = tmp_path / "data"
    with open_store(data) as store:
        store.vote(comparison(store, "oui 🇫🇷", "non"), "a")
        store.vote(comparison(store), "b")
        store.vote(comparison(store), "tie")
        store.finish_round(store.start_round("manual", settings={"ppo": {"steps": 7}}), "skipped", "too few votes")
    out = tmp_path / "votes.jsonl"
    result = run_cli("export", "--data-dir", str(data), "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["chosen"][0]["content"] == "oui 🇫🇷"
    assert "3 preference pairs" in result.stderr
    stats = run_cli("stats", "--data-dir", str(data))
    assert stats.returncode == 0, stats.stderr
    assert "a=1 b=1 tie=1 both_bad=0 total=3 pending=0" in stats.stdout
    assert "training pairs: 3 (2 A/B, 1 ties" in stats.stdout  # the count the export and a round use
    assert "skipped" in stats.stdout and "too few votes" in stats.stdout
    assert "settings" not in stats.stdout
    with_settings = run_cli("stats", "--data-dir", str(data), "--settings")
    assert with_settings.returncode == 0, with_settings.stderr
    assert 'settings: {"ppo": {"steps": 7}}' in with_settings.stdout
    missing = run_cli("export", "--data-dir", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert not (tmp_path / "nowhere").exists()
