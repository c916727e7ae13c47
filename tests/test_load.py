"""Votes under load: 50 concurrent HTTP clients × 20 side-by-side votes each (every client its
own Gradio session, plain HTTP to the Gradio API: send with compare, then vote), while training rounds read the votes in
another thread through their own connection. Every vote is stored once with its own id and
the choice its client made; no client ever sees an error such as "database is locked".

The app runs in-process on a free port with the tiny model and a temporary SQLite file."""

from __future__ import annotations

import json
import threading
import traceback
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app import AppConfig
from chatapp.service import LimitConfig
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import open_store
from tests.conftest import free_port, served_app
from training.round import RoundConfig, run_round

pytestmark = pytest.mark.slow

CLIENTS, VOTES = 50, 20
CHOICES = ("a", "b", "tie", "both_bad")


def _expected_choice(client: int, i: int) -> str:
    return CHOICES[(client + i) % len(CHOICES)]


def _call(http, url: str, session: str, api_name: str, *data):
    """One call of a Gradio endpoint over plain HTTP (``/gradio_api/call``), in the browser
    session ``session``; returns the final outputs, raises on an error event."""
    r = http.post(f"{url}gradio_api/call/{api_name}", json={"data": list(data), "session_hash": session})
    r.raise_for_status()
    event_id, event = r.json()["event_id"], None
    with http.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}") as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = line.partition(":")[2].strip()
                if event == "error":
                    raise RuntimeError(f"/{api_name} failed: {payload}")
                return json.loads(payload)
    raise RuntimeError(f"/{api_name}: the stream ended without a result")


def _client_votes(url: str, client: int) -> None:
    """One user: 20 comparisons, each voted, a new conversation every 5 (raises on any error).

    Plain HTTP, one session id per user (its own ``ChatSession`` on the server). No read
    timeout: on a loaded 2-core machine a reply may take long, and a browser would wait too;
    what must never happen is an error from the server."""
    session = uuid.uuid4().hex
    with httpx.Client(timeout=None) as http:
        for i in range(VOTES):
            if i % 5 == 0:
                _call(http, url, session, "new_conversation", "")
            out = _call(http, url, session, "send", f"client {client} vote {i}", True)
            answer_a, answer_b = out[2], out[3]  # chatbot, textbox, answer A, answer B, …
            assert isinstance(answer_a, str) and isinstance(answer_b, str)
            _call(http, url, session, f"vote_{_expected_choice(client, i)}")


def _read_votes_like_a_round(config: AppConfig, stop: threading.Event, seen: list) -> None:
    """A training round's reads, in a loop: all votes as pairs, counts, and a real
    ``run_round`` (it reads every vote, then skips: too few for its threshold)."""
    store = open_store(config.data_dir)  # its own connections, as the round's process has
    registry = AdapterRegistry(DataDir(config.data_dir), store)
    round_config = RoundConfig(data_dir=config.data_dir, model=config.model, min_votes=10**9)
    while not stop.is_set():
        pairs = store.vote_pairs()
        store.vote_counts()
        result = run_round(round_config, store, registry, trigger="load-test")
        assert result["status"] == "skipped", result
        seen.append(len(pairs))
        stop.wait(0.2)  # a round reads, then trains for a while; this keeps re-reading


def test_1000_votes_from_50_concurrent_clients_while_a_round_reads(tiny_model_dir, tmp_path):
    config = AppConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path / "data"), port=free_port(),
        max_new_tokens=2, temperature=1.0, no_train=True, concurrency=16,
        limits=LimitConfig(client_vote_rate="100000/minute"),  # 50 simulated users share 127.0.0.1
    )  # fmt: skip
    url = f"http://127.0.0.1:{config.port}/"
    with served_app(config):
        stop, seen, reader_errors = threading.Event(), [], []

        def reader():
            try:
                _read_votes_like_a_round(config, stop, seen)
            except Exception:  # noqa: BLE001 - reported by the assertion below
                reader_errors.append(traceback.format_exc())

        reading = threading.Thread(target=reader, name="round-reader")
        reading.start()
        errors: list[str] = []
        try:
            with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
                futures = [pool.submit(_client_votes, url, c) for c in range(CLIENTS)]
                for f in futures:
                    try:
                        f.result()
                    except Exception as exc:  # noqa: BLE001 - every user-visible error is collected
                        errors.append(f"{exc.__class__.__name__}: {exc}")
        finally:
            stop.set()
            reading.join()

    assert errors == [], f"{len(errors)} clients saw errors, e.g. {errors[:3]}"
    assert reader_errors == [], reader_errors[0]
    assert seen, "the round never read the votes"
    store = open_store(config.data_dir)
    rows = list(store.db.execute("SELECT id, choice, context, answer_a, answer_b FROM comparisons"))
    assert len(rows) == CLIENTS * VOTES
    assert len({r[0] for r in rows}) == len(rows), "comparison ids are not unique"
    assert all(r[1] is not None for r in rows), "a comparison was left without its vote"
    # each vote is the one its client cast, on the comparison of its own message
    got = {}
    for _, choice, context, _, _ in rows:
        last_user = json.loads(context)[-1]["content"]
        assert last_user not in got, f"two comparisons for {last_user!r}"
        got[last_user] = choice
    expected = {f"client {c} vote {i}": _expected_choice(c, i) for c in range(CLIENTS) for i in range(VOTES)}
    assert got == expected
    assert store.vote_counts()["total"] == CLIENTS * VOTES
    assert Counter(len(p["prompt"]) > 0 for p in store.vote_pairs())[True] == len(
        [r for r in rows if r[1] != "both_bad" and r[3].strip() != r[4].strip()]
    )
    sessions = store.db.execute("SELECT COUNT(DISTINCT session_id) FROM comparisons").fetchone()[0]
    assert sessions == CLIENTS
