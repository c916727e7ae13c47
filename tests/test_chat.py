"""Chat, compare and vote through the service layer, on a tiny real model and a real SQLite file."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from chatapp.engine import ChatEngine, Sampling
from chatapp.service import ChatService, ChatSession, PairConfig, UserInputError
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import AlreadyVoted, open_store
from training.chat_format import ContextTooLongError, fit_messages, render_prompt
from training.models import load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def service(tiny_model_dir, tmp_path):
    store = open_store(tmp_path / "data")
    registry = AdapterRegistry(DataDir(tmp_path / "data"), store)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    engine = ChatEngine(model, tok, registry)
    # two plain samples per comparison (the reward model's choice of pairs: test_pairs.py)
    return ChatService(engine, store, Sampling(max_new_tokens=8), seed=0, pairs=PairConfig(compare_samples=2))


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def _count(store, table):
    return store.db.execute(f"select count(*) from {table}").fetchone()[0]


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_message_is_refused_and_nothing_stored(service, text):
    session = ChatSession()
    with pytest.raises(UserInputError, match="empty"):
        _drain(service.chat(session, text))
    with pytest.raises(UserInputError):
        _drain(service.compare(session, text))
    assert _count(service.store, "messages") == 0
    assert _count(service.store, "conversations") == 0
    assert session.messages == []


def test_two_turn_chat_keeps_context_and_records_versions(service):
    session = ChatSession(system_prompt="Be brief.")
    streamed = list(service.chat(session, "hello there"))
    assert streamed, "the reply must stream at least one piece"
    assert all(streamed[i + 1].startswith(streamed[i]) for i in range(len(streamed) - 1))
    _drain(service.chat(session, "what is 12 plus 30?"))
    rows = service.store.messages(session.conversation_id)
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert [r["policy_version"] for r in rows if r["role"] == "assistant"] == [0, 0]
    # the second prompt holds the whole conversation, system prompt first
    ids = service.engine.prompt_ids(session.context()[:-1], 8)
    text = service.engine.tokenizer.decode(ids)
    assert text.index("Be brief.") < text.index("hello there") < text.index("what is 12 plus 30?")


def test_fit_messages_drops_oldest_whole_turns(tiny_model_dir):
    _, tok = load_model_and_tokenizer(tiny_model_dir)
    messages = [{"role": "system", "content": "sys"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    messages.append({"role": "user", "content": "newest"})
    full = len(render_prompt(tok, messages))
    kept = fit_messages(tok, messages, max_context_tokens=full // 2 + 10, max_new_tokens=10)
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1]["role"] == "user"  # starts on a whole turn
    assert 3 <= len(kept) < len(messages)
    assert len(render_prompt(tok, kept)) <= full // 2
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]  # a suffix of the turns
    assert fit_messages(tok, messages, full + 10, 10) == messages


def test_too_long_message_gets_a_clear_error_and_nothing_stored(service):
    session = ChatSession()
    with pytest.raises(ContextTooLongError, match="too long"):
        _drain(service.chat(session, "word " * 5000))
    assert _count(service.store, "messages") == 0


def test_compare_vote_continues_with_chosen_answer(service):
    session = ChatSession()
    _drain(service.compare(session, "spell cat backwards"))
    pending = session.pending
    assert pending is not None
    with pytest.raises(UserInputError, match="Vote"):
        _drain(service.chat(session, "another message"))
    row = service.store.comparison(pending.comparison_id)
    assert (row["answer_a"], row["answer_b"]) == (pending.replies[0].text, pending.replies[1].text)
    assert row["sampling_a"]["max_new_tokens"] == 8 and row["choice"] is None
    # comparisons sample purely (temperature 1, no nucleus cut): the distribution PPO trains on
    assert row["sampling_a"]["temperature"] == 1.0 and row["sampling_b"]["top_p"] == 1.0
    assert row["context"][-1] == {"role": "user", "content": "spell cat backwards"}
    service.vote(session, "b")
    assert session.messages[-1]["content"] == pending.replies[1].text
    stored = service.store.messages(session.conversation_id)
    assert stored[-1]["content"] == pending.replies[1].text and stored[-1]["role"] == "assistant"
    with pytest.raises(UserInputError):
        service.vote(session, "a")  # nothing pending any more
    with pytest.raises(AlreadyVoted):
        service.store.vote(pending.comparison_id, "a")
    assert service.store.comparison(pending.comparison_id)["choice"] == "b"


@pytest.mark.parametrize("redraws", [2, 0])
def test_b_answer_repeating_a_is_drawn_again(service, redraws, monkeypatch):
    # greedy decoding: every draw of B repeats A word for word, so each allowed redraw happens
    service.compare_sampling = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=8, min_new_tokens=8)
    service.distinct_redraws = redraws
    draws, real_submit = [], service.engine.batcher.submit

    def counted_submit(req):  # the real decode loop, the answers it is asked for counted
        draws.append(req)
        return real_submit(req)

    monkeypatch.setattr(service.engine.batcher, "submit", counted_submit)
    session = ChatSession()
    seen = list(service.compare(session, "hello"))
    row = service.store.comparison(session.pending.comparison_id)
    assert row["answer_a"] == row["answer_b"] != ""
    assert len(draws) == 2 + redraws
    # A is shown whole while B is drawn again: every update from the end of the first draw on
    assert all(a == row["answer_a"] for a, _ in seen[seen.index((row["answer_a"], row["answer_b"])):])
    assert row["sampling_b"].get("distinct_redraws", 0) == redraws
    assert "distinct_redraws" not in row["sampling_a"]


@pytest.mark.parametrize("choice", ["tie", "both_bad"])
def test_tie_and_both_bad_continue_with_a(service, choice):
    session = ChatSession()
    _drain(service.compare(session, "hello"))
    a_text = session.pending.replies[0].text
    service.vote(session, choice)
    assert session.messages[-1]["content"] == a_text
    assert service.store.vote_counts()[choice] == 1


def test_stopped_reply_is_marked_and_never_offered_for_voting(service):
    # a long reply (end-of-turn suppressed) so it cannot end on its own before the stop press
    service.compare_sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=240, min_new_tokens=240)
    session = ChatSession()
    stop = threading.Event()
    gen = service.compare(session, "hello", stop_event=stop)
    next(gen)  # the first streamed piece
    stop.set()
    _drain(gen)
    assert session.pending is None
    assert _count(service.store, "comparisons") == 0
    last = service.store.messages(session.conversation_id)[-1]
    assert last["role"] == "assistant" and last["sampling"]["stopped"] is True
    # the chat view marks it as stopped; the context the model sees next keeps the text as is
    from chatapp.display import reply_markdown
    from chatapp.ui import STOPPED_MARK, _display

    assert _display(session.messages)[-1]["content"] == reply_markdown(last["content"]) + STOPPED_MARK
    assert session.context()[-1] == {"role": "assistant", "content": last["content"]}
    _drain(service.chat(session, "and now?"))  # a reply that ends on its own is not marked
    assert not _display(session.messages)[-1]["content"].endswith(STOPPED_MARK)


def test_regenerate_replaces_the_last_plain_reply_and_training_never_sees_the_old_one(service):
    session = ChatSession()
    first = _drain(service.chat(session, "hello"))
    old_id = service.store.messages(session.conversation_id)[-1]["id"]
    second = _drain(service.regenerate(session))
    stored = service.store.messages(session.conversation_id)
    assert [m["role"] for m in stored] == ["user", "assistant"]  # the history stays well formed
    assert stored[-1]["content"] == second.text and stored[-1]["id"] != old_id
    content, replaced_at = service.store.db.execute(
        "select content, replaced_at from messages where id = ?", [old_id]).fetchone()
    assert content == first.text and replaced_at is not None  # kept for the record, marked
    assert session.context()[-1] == {"role": "assistant", "content": second.text}
    _drain(service.chat(session, "and then?"))
    histories = [p["messages"] for p in service.store.prompts()]
    assert [m["role"] for m in max(histories, key=len)] == ["user", "assistant", "user"]
    assert max(histories, key=len)[1]["content"] == second.text
    # only a plain reply can be regenerated: not an empty conversation, not a compared answer
    with pytest.raises(UserInputError, match="no plain reply"):
        _drain(service.regenerate(ChatSession()))
    _drain(service.compare(session, "compare this"))
    with pytest.raises(UserInputError, match="Vote on the two answers first"):
        _drain(service.regenerate(session))
    service.vote(session, "a")
    with pytest.raises(UserInputError, match="no plain reply"):
        _drain(service.regenerate(session))
    with pytest.raises(ValueError, match="no standing assistant message"):
        service.store.replace_reply(old_id)  # once only


def test_published_version_serves_the_next_reply(service, tmp_path):
    engine = service.engine
    registry = engine.registry
    # a new adapter with changed LoRA weights, published as version 1
    src = registry.path(0)
    from peft import PeftModel

    base, _ = load_model_and_tokenizer(Path(engine.model.peft_config["v0"].base_model_name_or_path))
    model = PeftModel.from_pretrained(base, str(src), is_trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    staging = registry.staging_dir()
    model.save_pretrained(str(staging))
    version = registry.publish(staging, parent=0, round_id=None, metrics={}, live=True)
    assert version == 1
    session = ChatSession()
    reply = _drain(service.chat(session, "hello"))
    assert reply.version == 1
    assert service.store.messages(session.conversation_id)[-1]["policy_version"] == 1
    # comparisons now pit live against its parent
    _drain(service.compare(session, "again"))
    assert sorted(r.version for r in session.pending.replies) == [0, 1]


def test_unloadable_model_exits_nonzero_with_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "app.py", "--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path / "d")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--model" in errors[0], proc.stderr
    assert "cannot load" in errors[0] and ".." not in errors[0]
    # nothing was written: the data dir is not tied to a model that never loaded
    assert not (tmp_path / "d" / "model.json").exists()
    # a data dir made for another model still reports the load failure, not the mismatch
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "model.json").write_text('{"model": "starter"}')
    again = subprocess.run(
        [sys.executable, "app.py", "--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path / "d")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert again.returncode != 0 and "cannot load" in again.stderr, again.stderr


def test_concurrency_sets_how_many_replies_are_decoded_together(tiny_model_dir, tmp_path):
    from app import AppConfig, chat_service, serving_engine

    store = open_store(tmp_path / "data")
    registry = AdapterRegistry(DataDir(tmp_path / "data"), store)
    config = AppConfig(concurrency=3, temperature=0.5)
    service = chat_service(config, serving_engine(config, str(tiny_model_dir), registry), store)
    assert service.engine.batcher.max_batch == 3
    assert service.sampling.temperature == 0.5 and store.live_version() == 0
