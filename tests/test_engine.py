"""Batched serving: concurrent replies decoded together, each stream holding only its own tokens;
requests joining and leaving mid-batch; stop and abandon; torn-free adapter hot-swap."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from chatapp.engine import ChatEngine, Sampling
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import open_store
from training.models import load_model_and_tokenizer

PROMPTS = ["hello there", "what is 12 plus 30?", "spell cat backwards", "the capital of France?", "my name is Ada"]


def make_engine(model_dir, data_dir, quantize="none", **kwargs) -> ChatEngine:
    """A ChatEngine over a fresh store/registry in ``data_dir`` (version 0 published)."""
    store = open_store(data_dir)
    registry = AdapterRegistry(DataDir(data_dir), store)
    model, tok = load_model_and_tokenizer(model_dir, quantize)
    return ChatEngine(model, tok, registry, **kwargs)


def publish_changed(engine: ChatEngine, model_dir, shift: float = 0.5, live: bool = True,
                    fill: float | None = None) -> int:
    """Publish a copy of version 0 with every LoRA B shifted by ``shift`` (a different policy), or
    set to ``fill`` (NaN, huge, or a real change); its parent is the version live now."""
    from peft import PeftModel

    base, _ = load_model_and_tokenizer(model_dir)
    model = PeftModel.from_pretrained(base, str(engine.registry.path(0)), is_trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and fill is not None:
                p.fill_(fill)
            elif "lora_B" in name:
                p.add_(shift)
    staging = engine.registry.staging_dir()
    model.save_pretrained(str(staging))
    return engine.registry.publish(staging, parent=engine.store.live_version(), round_id=None, metrics={}, live=live)


def msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def greedy(n: int) -> Sampling:
    """Greedy, exactly ``n`` tokens (end of turn suppressed), so replies really are long."""
    return Sampling(temperature=0.0, max_new_tokens=n, min_new_tokens=n)


class StepGate:
    """Blocks the decode loop at its ``at``-th model forward until :meth:`release` (no timing)."""

    def __init__(self, engine: ChatEngine, at: int):
        self.at, self.calls = at, 0
        self.reached, self.go = threading.Event(), threading.Event()
        self.handle = engine.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            assert self.go.wait(60), "test never released the decode loop"

    def release(self):
        self.go.set()

    def remove(self):
        self.go.set()
        self.handle.remove()


def wait_for(predicate, what: str, limit: float = 60.0):
    """Poll ``predicate`` (a liveness guard, not a speed assertion)."""
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def engine(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir, tmp_path / "data")
    publish_changed(eng, tiny_model_dir, live=False)  # version 1 exists, version 0 stays live
    return eng


def run_threads(fns):
    results = [None] * len(fns)
    errors = []

    def call(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    return threads, results, errors


def test_concurrent_replies_are_batched_and_match_solo_runs(engine):
    # (prompt, version, length): two adapters in one batch, different lengths so rows leave at
    # different steps; each must equal the same request decoded alone
    jobs = [(PROMPTS[0], 0, 12), (PROMPTS[1], 1, 30), (PROMPTS[2], 0, 21), (PROMPTS[3], 1, 40)]
    solo = [engine.reply(msgs(p), greedy(n), version=v).tokens for p, v, n in jobs]
    assert len({tuple(t) for t in solo}) == len(solo), "distinct prompts must give distinct replies"
    with engine.batcher.paused():  # queue all four so they are admitted together
        threads, results, errors = run_threads(
            [lambda p=p, v=v, n=n: engine.reply(msgs(p), greedy(n), version=v) for p, v, n in jobs]
        )
        wait_for(lambda: engine.batcher.counts()["pending"] == 4, "4 queued requests")
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert engine.batcher.stats["max_rows"] >= 4
    for (_, v, n), reply, expected in zip(jobs, results, solo, strict=True):
        assert reply.version == v and len(reply.tokens) == n and reply.finish == "length"
        assert reply.tokens == expected


def test_request_joins_a_running_batch(engine):
    first = engine.reply(msgs(PROMPTS[0]), greedy(40), version=0).tokens
    late = engine.reply(msgs(PROMPTS[4]), greedy(15), version=1).tokens
    gate = StepGate(engine, at=10)  # the 10th forward: the first reply is mid-way
    try:
        threads, results, errors = run_threads([lambda: engine.reply(msgs(PROMPTS[0]), greedy(40), version=0)])
        assert gate.reached.wait(60)
        t2, r2, e2 = run_threads([lambda: engine.reply(msgs(PROMPTS[4]), greedy(15), version=1)])
        wait_for(lambda: engine.batcher.counts()["pending"] == 1, "the late request queued")
        gate.release()
        for t in threads + t2:
            t.join(120)
    finally:
        gate.remove()
    assert not errors and not e2, errors + e2
    assert engine.batcher.stats["max_rows"] >= 2
    assert results[0].tokens == first and r2[0].tokens == late


def test_stop_and_abandon_end_only_that_request(engine):
    # greedy replies of the tiny model: PROMPTS[1] → "((((…", PROMPTS[4] → "JapJap…" (visible text)
    other_solo = engine.reply(msgs(PROMPTS[2]), greedy(60)).tokens
    stop = threading.Event()
    threads, results, errors = run_threads([lambda: engine.reply(msgs(PROMPTS[2]), greedy(60))])
    gen = engine.stream(msgs(PROMPTS[4]), greedy(200), stop_event=stop)
    next(gen)
    stop.set()
    while True:
        try:
            next(gen)
        except StopIteration as done:
            stopped = done.value
            break
    assert stopped.stopped and stopped.finish == "stopped" and len(stopped.tokens) < 200
    # an abandoned stream (closed tab): the generator is closed without reading further
    before = engine.batcher.stats["tokens"]
    gen = engine.stream(msgs(PROMPTS[1]), greedy(200))
    next(gen)
    gen.close()
    for t in threads:
        t.join(120)
    wait_for(lambda: not engine.batcher.alive(), "the decode loop to go idle")
    assert engine.batcher.stats["tokens"] - before < 200 + 60, "the abandoned request kept decoding"
    assert not errors and results[0].tokens == other_solo and not results[0].stopped


def test_stop_before_admission_generates_nothing(engine):
    stop = threading.Event()
    stop.set()
    gen = engine.stream(msgs(PROMPTS[0]), greedy(50), stop_event=stop)
    assert next(gen) == ""  # a stream yields at least once
    with pytest.raises(StopIteration) as done:
        next(gen)
    assert done.value.value.stopped and done.value.value.tokens == []


@pytest.mark.parametrize(
    "sampling",
    [greedy(200), Sampling(temperature=1.0, top_p=1.0, max_new_tokens=200, min_new_tokens=200, seed=7)],
    ids=["greedy", "seeded-sampling"],
)
def test_hot_swap_mid_reply_is_torn_free(engine, tiny_model_dir, sampling):
    """A 200-token reply during which a new version goes live is token-identical to the same
    reply with nothing published; the next reply uses the new version. (The greedy reply of the
    random tiny model repeats few tokens; the seeded sampled one varies every token.)"""
    prompt = msgs(PROMPTS[0])
    baseline = engine.reply(prompt, sampling)
    assert baseline.version == 0 and len(baseline.tokens) == 200
    gate = StepGate(engine, at=100)  # halfway through the reply
    try:
        threads, results, errors = run_threads([lambda: engine.reply(prompt, sampling)])
        assert gate.reached.wait(60)
        published = publish_changed(engine, tiny_model_dir, shift=1.0, live=True)
        assert engine.live_version() == published
        gate.release()
        threads[0].join(120)
    finally:
        gate.remove()
    assert not errors, errors
    assert results[0].version == 0
    assert results[0].tokens == baseline.tokens
    after = engine.reply(prompt, sampling)
    assert after.version == published
    assert after.tokens != baseline.tokens, "the new version must change the reply (else the test proves nothing)"


def test_adapter_eviction_keeps_running_versions(tiny_model_dir, tmp_path):
    eng = make_engine(tiny_model_dir, tmp_path / "data", keep_loaded=1)
    for shift in (0.3, 0.6):
        publish_changed(eng, tiny_model_dir, shift=shift, live=False)
    replies = [eng.reply(msgs(PROMPTS[0]), greedy(5), version=v) for v in (0, 1, 2, 0)]
    assert [r.version for r in replies] == [0, 1, 2, 0]
    assert replies[0].tokens == replies[3].tokens  # reloading version 0 gives the same policy
    assert len(eng.model.peft_config) <= 2  # keep_loaded=1 plus the live version


def test_a_failing_request_fails_alone(engine):
    """A request for a version with no adapter raises in its own stream; serving goes on."""
    expected = engine.reply(msgs(PROMPTS[1]), greedy(20)).tokens
    with engine.batcher.paused():
        threads, results, errors = run_threads(
            [lambda: engine.reply(msgs(PROMPTS[1]), greedy(20)), lambda: engine.reply(msgs(PROMPTS[0]), greedy(5), version=99)]
        )
        wait_for(lambda: engine.batcher.counts()["pending"] == 2, "2 queued requests")
    for t in threads:
        t.join(120)
    assert len(errors) == 1 and isinstance(errors[0], (FileNotFoundError, KeyError, ValueError))
    assert results[0].tokens == expected
    assert engine.reply(msgs(PROMPTS[1]), greedy(20)).tokens == expected


def test_on_busy_hook_brackets_decoding(engine):
    """The hook the app can use to pause training while chat decodes: True before the first
    forward of a busy spell, False after the last, once each."""
    calls = []
    engine.batcher.on_busy = lambda busy: calls.append((busy, engine.batcher.stats["steps"]))
    engine.reply(msgs(PROMPTS[1]), greedy(10))
    wait_for(lambda: not engine.batcher.alive(), "the decode loop to go idle")
    assert [c[0] for c in calls] == [True, False]
    assert calls[1][1] - calls[0][1] == 9  # all 9 decoding steps happened in between


def test_stream_coalesces_updates_but_never_delays_the_end(tiny_model_dir, tmp_path):
    # an update interval far longer than the reply: the first text comes at once, every later
    # token piles up, and the end wakes the reader (it does not sit out the interval)
    eng = make_engine(tiny_model_dir, tmp_path / "data", stream_interval_s=600.0)
    gen = eng.stream(msgs(PROMPTS[1]), greedy(30))
    updates = []
    while True:
        try:
            updates.append(next(gen))
        except StopIteration as done:
            reply = done.value
            break
    assert len(reply.tokens) == 30 and reply.finish == "length"
    assert len(updates) == 2, updates  # the first text, then everything else at the end
    assert updates[-1] == reply.text
    # with no interval every token that adds text is its own update
    eager = make_engine(tiny_model_dir, tmp_path / "data2", stream_interval_s=0.0)
    eager_updates = list(eager.stream(msgs(PROMPTS[1]), greedy(30)))
    assert len(eager_updates) > 2
    assert eager_updates[-1] == reply.text
    with pytest.raises(ValueError, match="stream_interval_s"):
        make_engine(tiny_model_dir, tmp_path / "data3", stream_interval_s=-1.0)
