"""The two answers of a comparison stream at the same time, decoded in one batch
(``ChatEngine.stream_many`` under ``ChatService.compare``), on a tiny real model and a real
SQLite file; each answer recorded with the version that wrote it."""

from __future__ import annotations

import threading

import pytest
import torch

from chatapp.service import ChatService, ChatSession, PairConfig
from chatapp.streams import drain
from tests.test_engine import PROMPTS, greedy, make_engine, msgs, publish_changed, wait_for

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTH = 40  # tokens per answer: long enough to be seen half-written
VISIBLE = PROMPTS[2]  # versions 0 and 1 of two_versions() write different visible text to it


def two_versions(model_dir, data_dir, live: bool, **kwargs):
    """An engine with version 0 and version 1 = version 0 with every LoRA B shifted by 0.05
    (its parent; ``live``: version 1 serves), the LoRA init seeded so that both write visible
    text from their first tokens (a larger shift, or another init, writes undecodable bytes)."""
    torch.manual_seed(0)
    engine = make_engine(model_dir, data_dir, **kwargs)
    assert publish_changed(engine, model_dir, shift=0.05, live=live) == 1
    return engine


class ForwardLog:
    """Records every forward of the engine's model (batch size, adapter names per row) and holds
    the decode loop at its ``hold_at``-th forward until ``go`` is set (at most ``limit`` s, so a
    wrong implementation fails on its assertions instead of hanging)."""

    def __init__(self, engine, hold_at: int | None = None, limit: float = 30.0):
        self.batches: list[tuple[int, tuple]] = []
        self.hold_at, self.limit = hold_at, limit
        self.go = threading.Event()
        self.handle = engine.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.batches.append((kwargs["input_ids"].shape[0], tuple(kwargs.get("adapter_names") or ())))
        if len(self.batches) == self.hold_at:
            self.go.wait(self.limit)

    def remove(self):
        self.go.set()
        self.handle.remove()


@pytest.fixture
def live_and_parent(tiny_model_dir, tmp_path):
    """A service whose comparisons pit live version 1 against its parent 0 (``random``
    selection), greedy answers of exactly ``LENGTH`` tokens, streamed without coalescing."""
    engine = two_versions(tiny_model_dir, tmp_path / "data", live=True, stream_interval_s=0.0)
    service = ChatService(engine, engine.store, greedy(LENGTH), seed=0, compare_sampling=greedy(LENGTH),
                          pairs=PairConfig(compare_samples=2))
    return service


def test_both_answers_grow_during_one_comparison_in_one_batch(live_and_parent):
    service = live_and_parent
    # the decode loop is held after 10 forwards (both answers half-written) until the reader
    # has shown both: a sequential comparison has no B text then and fails below
    log = ForwardLog(service.engine, hold_at=10)
    session, seen = ChatSession(), []
    try:
        gen = service.compare(session, VISIBLE)
        for pair in gen:
            seen.append(pair)
            if all(pair):
                log.go.set()
    finally:
        log.remove()
    final = tuple(r.text for r in session.pending.replies)
    assert all(final) and final[0] != final[1], "the two versions must write different answers"
    assert seen[-1] == final
    # both half-written at once (A still growing while B already shows text)
    assert any(all(pair) and pair[0] != final[0] and pair[1] != final[1] for pair in seen), seen
    # every A and B yielded only ever grows (B's stream did not start over)
    for k in (0, 1):
        assert all(seen[i + 1][k].startswith(seen[i][k]) for i in range(len(seen) - 1))
    # both rows decoded by the same forwards, each with its own version's adapter: one prefill
    # (or two, when B was queued just after the loop took A) and LENGTH - 1 shared steps
    names = tuple(service.engine.adapter_name(r.version) for r in session.pending.replies)
    assert sum(1 for batch in log.batches if batch == (2, names)) >= LENGTH - 1
    assert len(log.batches) <= LENGTH + 1


def test_each_answer_is_recorded_with_the_version_that_wrote_it(live_and_parent):
    service = live_and_parent
    engine = service.engine
    for i in (2, 4):  # the A/B order is random: the check holds whichever version is A
        session = ChatSession()
        drain(service.compare(session, PROMPTS[i]))
        row = service.store.comparison(session.pending.comparison_id)
        assert {row["version_a"], row["version_b"]} == {0, 1} and row["selection"] == "random"
        context = msgs(PROMPTS[i])
        solo = {v: engine.reply(context, greedy(LENGTH), version=v).text for v in (0, 1)}
        assert solo[0] != solo[1], "the versions must differ (else a swap goes unseen)"
        assert row["answer_a"] == solo[row["version_a"]] and row["answer_b"] == solo[row["version_b"]]
        assert [r.version for r in session.pending.replies] == [row["version_a"], row["version_b"]]


def test_stream_many_matches_solo_replies_and_returns_them_in_order(tiny_model_dir, tmp_path):
    engine = two_versions(tiny_model_dir, tmp_path / "data", live=False)
    versions = [1, 0, 0]
    solo = [engine.reply(msgs(VISIBLE), greedy(12), version=v) for v in versions]
    gen = engine.stream_many(msgs(VISIBLE), versions, greedy(12))
    updates = []
    while True:
        try:
            updates.append(next(gen))
        except StopIteration as done:
            replies = done.value
            break
    assert all(len(u) == 3 for u in updates) and updates[-1] == [r.text for r in replies]
    assert [r.version for r in replies] == versions
    assert [r.tokens for r in replies] == [r.tokens for r in solo]
    assert solo[0].tokens != solo[1].tokens
    assert all(r.finish == "length" and not r.stopped for r in replies)
    assert engine.batcher.stats["max_rows"] == 3
    with pytest.raises(ValueError, match="at least one version"):
        drain(engine.stream_many(msgs(PROMPTS[1]), []))


def test_closing_or_failing_stream_many_stops_every_answer(tiny_model_dir, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path / "data")
    # a closed tab: both long answers end at the decode loop's next step
    before = engine.batcher.stats["tokens"]
    gen = engine.stream_many(msgs(PROMPTS[1]), [0, 0], greedy(200))
    next(gen)
    gen.close()
    wait_for(lambda: not engine.batcher.alive(), "the decode loop to go idle")
    assert engine.batcher.stats["tokens"] - before < 200, "an abandoned answer kept decoding"
    # one request fails (no such version): the error is raised and the other answer stopped
    stop = threading.Event()
    with pytest.raises((FileNotFoundError, KeyError, ValueError)):
        drain(engine.stream_many(msgs(PROMPTS[1]), [0, 99], greedy(200), stop_event=stop))
    assert stop.is_set()
    wait_for(lambda: not engine.batcher.alive(), "the decode loop to go idle")
