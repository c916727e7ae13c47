"""Nothing bad is served: a live adapter with flipped bits, NaN weights, overflowing logits or a
truncated file is taken out of service with a logged reason, and the last good version serves —
at startup (the app starts anyway) and on a hot-swap. Tiny real model, real files, real SQLite."""

from __future__ import annotations

import logging

import pytest

from chatapp.engine import ChatEngine
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import open_store
from tests.test_engine import greedy, make_engine, msgs, publish_changed
from training.models import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


def publish_b(engine: ChatEngine, model_dir, fill: float, live: bool = True) -> int:
    """Publish a copy of version 0 with every LoRA B set to ``fill`` (NaN, huge, or a real change)."""
    return publish_changed(engine, model_dir, live=live, fill=fill)


def answer(engine: ChatEngine, text: str, n: int):
    """The finished :class:`chatapp.engine.Reply` to ``text`` (greedy, ``n`` tokens)."""
    gen = engine.stream(msgs(text), greedy(n))
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


def restart(data) -> ChatEngine:
    """A new engine on the same data dir and a fresh model: what the app does when it starts."""
    store = open_store(data)
    model, tok = load_model_and_tokenizer(_model_dir(data))
    return ChatEngine(model, tok, AdapterRegistry(DataDir(data), store))


def _model_dir(data):
    return (data.parent / "model-dir").read_text()


@pytest.fixture
def served(tiny_model_dir, tmp_path):
    """``(engine, data dir)``: version 0 and a good version 1 (live) published."""
    data = tmp_path / "data"
    engine = make_engine(tiny_model_dir, data)
    (tmp_path / "model-dir").write_text(str(tiny_model_dir))
    assert publish_b(engine, tiny_model_dir, 0.02) == 1
    return engine, data


def _flip_a_bit(path):
    weights = path / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor's data: still a valid file, other numbers
    weights.write_bytes(bytes(raw))


def _truncate(path):
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.parametrize("damage", [_flip_a_bit, _truncate])
def test_a_damaged_live_adapter_is_replaced_by_the_last_good_version_at_startup(damage, served, caplog):
    engine, data = served
    damage(engine.registry.path(1, verify=False))
    with caplog.at_level(logging.ERROR, logger="chatapp.engine"):
        again = restart(data)  # starts anyway
    assert again.live_version() == 0 and again.store.live_version() == 0
    row = again.store.version(1)
    assert row["status"] == "rejected" and "checksum" in row["note"]
    assert "policy version 1 cannot be served" in caplog.text and "version 0 serves instead" in caplog.text
    assert answer(again, "hello", 3).version == 0


def test_an_unverifiable_truncated_adapter_fails_to_load_and_falls_back(served):
    engine, data = served
    engine.store.db.execute("UPDATE policy_versions SET checksum = NULL WHERE version = 1")  # published before checksums
    _truncate(engine.registry.path(1))
    again = restart(data)
    assert again.live_version() == 0
    assert again.store.version(1)["status"] == "rejected"


@pytest.mark.parametrize(("fill", "why"), [(float("nan"), "NaN or inf (e.g."), (3e38, "NaN or inf logits")])
def test_nan_weights_or_overflowing_logits_are_never_served_after_a_restart(fill, why, served):
    engine, data = served
    bad = publish_b(engine, _model_dir(data), fill)  # a round published it, checksum and all
    assert engine.store.live_version() == bad
    again = restart(data)
    assert again.live_version() == 1
    assert why in again.store.version(bad)["note"]
    reply = answer(again, "hello", 3)
    assert reply.version == 1 and reply.text


def test_a_nan_version_published_while_serving_is_skipped_on_the_next_reply(served):
    engine, data = served
    assert answer(engine, "hi", 2).version == 1
    bad = publish_b(engine, _model_dir(data), float("nan"))
    reply = answer(engine, "hi", 2)
    assert reply.version == 1 and engine.store.live_version() == 1
    assert engine.store.version(bad)["status"] == "rejected"
    good = publish_b(engine, _model_dir(data), 0.03)  # the next good version goes live as usual
    assert answer(engine, "hi", 2).version == good


def test_when_no_version_can_be_served_a_fresh_adapter_is_published(served):
    engine, data = served
    for version in (0, 1):
        _flip_a_bit(engine.registry.path(version, verify=False))
    again = restart(data)
    fresh = again.live_version()
    assert fresh == 2 and again.store.version(fresh)["parent"] is None
    assert {again.store.version(v)["status"] for v in (0, 1)} == {"rejected"}
    assert answer(again, "hello", 2).version == fresh
