"""The whole loop through the app's HTTP API (gradio_client), with a tiny model built in the test:
chat → 20 side-by-side votes → one training round (a real child process) → version 1 live →
the next reply is recorded with version 1; LoRA weights changed, base weights did not."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app import AppConfig
from storage.paths import DataDir
from storage.store import open_store
from tests.conftest import fetch_export, free_port, served_app
from training.gate import GateConfig
from training.ppo import PPOConfig
from training.round import RoundConfig
from training.user_gate import UserGateConfig

pytestmark = pytest.mark.slow


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def running_app(tiny_model_dir, tmp_path):
    port = free_port()
    config = AppConfig(
        model=str(tiny_model_dir),
        data_dir=str(tmp_path / "data"),
        port=port,
        min_new_votes=10,
        user_gate=UserGateConfig(user_gate=False),  # a trained round goes live at once (users' gate: test_user_gate)
        max_new_tokens=12,
        temperature=1.0,
        # every trained round is published (the gate has its own tests); a short round, passed to the child
        round=RoundConfig(min_votes=10, gate=GateConfig(enabled=False), ppo=PPOConfig(steps=6, rollout_batch_size=16)),
    )
    with served_app(config) as (demo, scheduler):
        yield config, demo, scheduler


def test_chat_vote_train_hot_swap(running_app, tiny_model_dir):
    from gradio_client import Client

    config, demo, scheduler = running_app
    data_dir = Path(config.data_dir)
    store = open_store(data_dir)
    base_digest = _digest(Path(tiny_model_dir))

    client = Client(f"http://127.0.0.1:{config.port}/", verbose=False)
    # a 2-turn chat
    client.predict("hello there", False, api_name="/send")
    chat, *_ = client.predict("what is 12 plus 30?", False, api_name="/send")
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    # a round with too few votes is skipped, its reason recorded
    skipped = scheduler.run_now("manual")
    assert skipped["status"] == "skipped" and "too few votes" in skipped["reason"]

    # 20 comparisons, voted over HTTP (new conversation every 5 to vary the prompts)
    prompts = ["hello", "what is 2 plus 3?", "spell dog backwards", "capital of France?", "my name is Ada"]
    for i in range(20):
        if i % 5 == 0:
            client.predict("", api_name="/new_conversation")
        *_, turn = client.predict(prompts[i % 5], True, api_name="/send")
        assert isinstance(turn["answer_a"], str) and isinstance(turn["answer_b"], str)
        row = store.comparison(turn["comparison_id"])  # the API names the stored comparison, raw texts
        assert (row["answer_a"], row["answer_b"]) == (turn["answer_a"], turn["answer_b"])
        assert [row["version_a"], row["version_b"]] == turn["versions"]
        client.predict(api_name="/vote_a" if i % 2 == 0 else "/vote_b")
    counts = store.vote_counts()
    assert counts["total"] == 20 and counts["a"] == 10 and counts["b"] == 10 and counts["pending"] == 0

    # one round, through the same path the scheduler takes (a child process)
    result = scheduler.run_now("manual")
    log = DataDir(data_dir).training_log.read_text(errors="replace")
    assert result["status"] == "succeeded", f"{result}\n{log[-3000:]}"
    assert result["version"] == 1
    assert store.live_version() == 1
    assert [v["version"] for v in store.versions()] == [0, 1]
    metrics = result["metrics"]
    for key in ("rm/accuracy", "objective/kl", "objective/reward", "ppo/clipfrac"):
        assert key in metrics, key
    # the child ran with the app's --round.* settings, and the round's row says so
    ppo_settings = store.round(result["id"])["settings"]["ppo"]
    assert (ppo_settings["steps"], ppo_settings["rollout_batch_size"]) == (6, 16)
    assert metrics["ppo/samples"] == 6 * 16

    # the next reply comes from version 1, with no restart
    client.predict("hello again", False, api_name="/send")
    conversations = store.db.execute(
        "select policy_version from messages where role = 'assistant' order by id desc limit 1"
    ).fetchone()
    assert conversations[0] == 1

    # LoRA weights changed, base weights did not
    v0 = load_file(str(DataDir(data_dir).adapters / "v0" / "adapter_model.safetensors"))
    v1 = load_file(str(DataDir(data_dir).adapters / "v1" / "adapter_model.safetensors"))
    assert v0.keys() == v1.keys() and len(v0) > 0
    assert any(not torch.equal(v0[k], v1[k]) for k in v0)
    assert all("lora_" in k for k in v1), "the adapter must hold LoRA weights only, no base weights"
    assert _digest(Path(tiny_model_dir)) == base_digest
    adapter_config = json.loads((DataDir(data_dir).adapters / "v1" / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]).resolve() == Path(tiny_model_dir).resolve()

    # the Training tab reports the round; the export holds the votes it trained on
    status, rounds, _ = client.predict(api_name="/training_status")
    assert "Live policy version:** 1" in status
    assert any(row[2] == "succeeded" for row in rounds["data"])
    exported = fetch_export(f"http://127.0.0.1:{config.port}/", client.predict(api_name="/export_votes"))
    lines = exported.splitlines()
    distinct = [c for c in store.voted_comparisons() if c["answer_a"].strip() != c["answer_b"].strip()]
    assert len(lines) == len(distinct) >= 15  # a pair of identical answers says nothing: left out
    assert set(json.loads(lines[0])) == {"prompt", "chosen", "rejected", "tie", "conversation_id"}
    assert len(lines) == result["votes_used"]  # exactly the pairs the round trained on
