"""Shared fixtures: a tiny real causal LM with a trained tokenizer and a chat template.

The model is a 2-layer Llama built from a config (hidden size 32), saved with
``save_pretrained`` and loaded back through the same code path as a hub model.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from training.starter.tiny import TINY_TEXTS, build_tiny_model  # noqa: E402,F401 - fixtures' model


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matmuls: one thread avoids OpenMP spin contention on a shared 2-core machine (use
    with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path):
    """A real SQLite store in a fresh data folder, closed afterwards."""
    from storage.store import open_store

    s = open_store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path to a saved tiny Llama + tokenizer with chat template (session-scoped, read-only)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def world(tiny_model_dir, tmp_path):
    """``(store, registry, data dir)`` with version 0 published by a real engine, as the app does."""
    from chatapp.engine import ChatEngine
    from storage.paths import DataDir
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from training.models import load_model_and_tokenizer

    data = tmp_path / "data"
    store = open_store(data)
    registry = AdapterRegistry(DataDir(data), store)
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    ChatEngine(model, tok, registry)  # publishes v0
    return store, registry, data


def add_votes(store, n: int, choices=("a", "b")) -> None:
    """Store ``n`` voted comparisons, three per conversation; answer A is always the short one and
    the votes cycle through ``choices``. The assistant turn "ok i" follows each user turn."""
    for i in range(n):
        if i % 3 == 0:
            conv = store.new_conversation(f"s{i}")
        question = f"question number {i}"
        store.add_message(conv, "user", question)
        context = [{"role": "user", "content": question}]
        cid = store.add_comparison(conv, f"s{i}", context, f"ok {i}", f"a much longer answer {i} " * 3, 0, 0, {}, {})
        store.vote(cid, choices[i % len(choices)])
        store.add_message(conv, "assistant", f"ok {i}", policy_version=0)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for an app under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(config):
    """``app.build_app(config)`` served on ``config.port`` through the app's own ``launch``,
    without blocking; yields ``(demo, scheduler)`` and always closes the server and shuts the
    scheduler (if any) down."""
    from app import build_app, launch

    demo, scheduler = build_app(config)
    try:
        launch(demo, config, block=False)
        yield demo, scheduler
    finally:
        demo.close()
        if scheduler is not None:
            scheduler.shutdown()


def fetch_export(url: str, answer: str) -> str:
    """The JSONL behind the one-time link in ``/export_votes``'s ``answer`` (Markdown), fetched
    over HTTP from the app at ``url``."""
    import re

    import httpx

    (link,) = re.findall(r"\]\((/rlhf/export/[\w-]+)\)", answer)
    response = httpx.get(url.rstrip("/") + link, timeout=30)
    response.raise_for_status()
    return response.text
