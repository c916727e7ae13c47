"""What a version changed: the gate's answers of live and the candidate on a few held-out prompts,
kept in the published version's directory (inside its checksum) and read back raw
(storage.versions.write_changes / version_changes), on a tiny real model and real rounds."""

from __future__ import annotations

import json

import pytest
import torch

from storage.errors import UnknownVersion
from storage.registry import CorruptAdapter
from storage.versions import CHANGES_FILE, read_changes, version_changes, write_changes
from tests.conftest import add_votes
from tests.test_jobs import _config
from training.gate import GateConfig, run_gate
from training.models import LoraSettings, add_lora, load_model_and_tokenizer
from training.rollout import generate_rollouts
from training.round import run_round

pytestmark = pytest.mark.usefixtures("single_thread")

RAW = "<img src=x onerror=alert(1)> 2 < 3 && 5 > 4 <|im_end|> «ünïcode»"


def test_changes_are_written_and_read_back_raw(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": RAW}]
    write_changes(tmp_path, 3, [{"messages": messages, "before": RAW + " old", "after": "new " + RAW,
                                 "before_reward": 0.25, "after_reward": float("nan")}])
    (change,) = read_changes(tmp_path, 4)
    assert change == {"prompt": RAW, "messages": messages, "before": RAW + " old", "before_version": 3,
                      "before_reward": 0.25, "after": "new " + RAW, "after_version": 4, "after_reward": None}
    assert RAW in (tmp_path / CHANGES_FILE).read_text(encoding="utf-8")  # no escaping on disk either
    assert read_changes(tmp_path / "elsewhere", 4) == []  # no file: nothing kept


def test_bad_changes_are_refused_with_a_clear_error(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}], "before": "a", "after": "b"}
    with pytest.raises(ValueError, match="'after' must be a string"):
        write_changes(tmp_path, 0, [{**good, "after": None}])
    with pytest.raises(ValueError, match="messages"):
        write_changes(tmp_path, 0, [{**good, "messages": []}])
    with pytest.raises(ValueError, match="before_version"):
        write_changes(tmp_path, -1, [good])
    (tmp_path / CHANGES_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_changes(tmp_path, 1)
    (tmp_path / CHANGES_FILE).write_text(json.dumps({"format": 99, "changes": []}))
    with pytest.raises(ValueError, match="format"):
        read_changes(tmp_path, 1)


def _two_adapters(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    policy = add_lora(model, LoraSettings(r=4), adapter_name="live")
    policy.add_adapter("candidate", LoraSettings(r=4).peft_config())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_A.candidate" in name or "lora_B.candidate" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    policy.set_adapter("live")
    return policy, tok


def test_the_gate_keeps_each_versions_answer_to_the_first_distinct_prompts(tiny_model_dir):
    policy, tok = _two_adapters(tiny_model_dir)
    distinct = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    prompts = [distinct[0], distinct[0], *distinct[1:]]  # a repeated prompt counts once
    config = GateConfig(n_prompts=12, max_new_tokens=6, min_win_rate=0.0, max_kl=1e9, changes=3)
    reward = lambda p, a: torch.tensor([float(len(x)) for x in a])  # noqa: E731
    result = run_gate(policy, tok, reward, prompts, config, candidate_adapter="candidate", live_adapter="live")
    assert [s["messages"] for s in result.samples] == distinct[:3]
    # each version's own answer, as that version samples it alone with the gate's row seeds
    answers = {}
    for name in ("live", "candidate"):
        policy.set_adapter(name)
        answers[name] = generate_rollouts(policy, tok, distinct[:3], config.max_new_tokens, seed=config.seed).answers
    policy.set_adapter("live")
    assert answers["live"] != answers["candidate"]
    assert [s["before"] for s in result.samples] == answers["live"]
    assert [s["after"] for s in result.samples] == answers["candidate"]
    assert [s["before_reward"] for s in result.samples] == [float(len(a)) for a in answers["live"]]
    assert [s["after_reward"] for s in result.samples] == [float(len(a)) for a in answers["candidate"]]
    # never more rows than distinct prompts; none when asked for none
    many = run_gate(policy, tok, reward, prompts, GateConfig(n_prompts=12, max_new_tokens=6, changes=50),
                    candidate_adapter="candidate", live_adapter="live")
    assert [s["messages"] for s in many.samples] == distinct
    none = run_gate(policy, tok, reward, prompts, GateConfig(n_prompts=12, max_new_tokens=6, changes=0),
                    candidate_adapter="candidate", live_adapter="live")
    assert none.samples == []
    with pytest.raises(ValueError, match="changes"):
        GateConfig(changes=-1)


def test_a_round_publishes_its_changes_inside_the_versions_checksum(world, tiny_model_dir):
    store, registry, data = world
    add_votes(store, 12)
    gate = GateConfig(n_prompts=4, max_new_tokens=6, min_win_rate=0.0, max_kl=1e9, min_rm_accuracy=0.0,
                      rm_accuracy_z=0.0, changes=6)
    result = run_round(_config(data, tiny_model_dir, gate=gate), store, registry)
    assert result["status"] in ("succeeded", "rejected"), result
    version = result["version"]
    changes = version_changes(registry, version)
    assert 1 <= len(changes) <= gate.n_prompts // gate.samples_per_prompt
    stored = [p["messages"] for p in store.prompts()]
    for change in changes:
        assert change["messages"] in stored  # a held-out prompt of this data dir, as stored
        assert change["prompt"] == change["messages"][-1]["content"]
        assert isinstance(change["before"], str) and isinstance(change["after"], str)
        assert (change["before_version"], change["after_version"]) == (store.version(version)["parent"], version) == (0, version)
    assert len({json.dumps(c["messages"]) for c in changes}) == len(changes)  # distinct prompts
    path = registry.path(version)  # verified: the checksum was taken with changes.json in place
    (path / CHANGES_FILE).write_text((path / CHANGES_FILE).read_text() + " ")
    with pytest.raises(CorruptAdapter):
        registry.path(version)
    assert version_changes(registry, 0) == []  # the base: nothing changed
    with pytest.raises(UnknownVersion):
        version_changes(registry, 99)


def test_a_round_without_the_gate_keeps_no_changes(world, tiny_model_dir):
    store, registry, data = world
    add_votes(store, 12)
    result = run_round(_config(data, tiny_model_dir, gate=GateConfig(enabled=False)), store, registry)
    assert result["status"] == "succeeded", result
    assert version_changes(registry, result["version"]) == []
    assert not (registry.path(result["version"]) / CHANGES_FILE).exists()
