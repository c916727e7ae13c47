"""Chat templates of real model families, on tiny random models built in the test: special
tokens (Llama 3's role headers are special only as added tokens) never reach replies, the
database or the export; a template without a system role still answers with a system prompt;
the reward model scores the end of turn the template itself writes; ``--chat-template FILE``
serves a model that has no template."""

from __future__ import annotations

import json

import pytest
import torch

from chatapp.engine import ChatEngine, Sampling
from chatapp.service import ChatService, ChatSession
from storage.paths import DataDir
from storage.registry import AdapterRegistry
from storage.store import open_store
from tests.test_chat import _drain
from training.chat_format import chat_format, end_of_turn_ids, render_prompt
from training.models import ModelLoadError, load_model_and_tokenizer, load_tokenizer
from training.preferences import answer_span
from training.rollout import generate_rollouts
from training.starter.tiny import GEMMA_TEMPLATE, build_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

HEADERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _uniform(model_dir):
    """Make the saved model's next-token distribution uniform (final norm weight 0, tied
    embeddings: every logit is 0), so that every token, role headers included, is sampled."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return _uniform(build_tiny_model(tmp_path_factory.mktemp("llama3"), family="llama3"))


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gemma"), family="gemma")


def _service(model_dir, data, **kw):
    store = open_store(data)
    registry = AdapterRegistry(DataDir(data), store)
    model, tok = load_model_and_tokenizer(model_dir, **kw)
    return ChatService(ChatEngine(model, tok, registry), store, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=40), seed=0)


def test_llama3_role_headers_are_special_though_not_in_all_special_ids(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    ids = [tok.convert_tokens_to_ids(h) for h in HEADERS]
    assert not set(ids) & set(tok.all_special_ids)  # the trap: the usual special list misses them
    fmt = chat_format(tok)
    assert set(ids) <= fmt.special_ids and set(ids) <= fmt.template_ids
    assert tok.convert_ids_to_tokens(list(fmt.end_of_turn)) == ["<|eot_id|>"]


def test_sampled_llama3_headers_never_leak_into_replies_votes_exports_or_rollouts(llama3_dir, tmp_path):
    service = _service(llama3_dir, tmp_path / "data")
    tok, store = service.engine.tokenizer, service.store
    header_ids = {tok.convert_tokens_to_ids(h) for h in HEADERS}
    for i in range(6):
        session = ChatSession(system_prompt="You are Robo.")
        _drain(service.chat(session, f"hello there {i}"))
        _drain(service.compare(session, "what is 12 plus 30?"))
        service.vote(session, "a")
    texts = [r[0] for r in store.db.execute("select content from messages")]
    texts += [v for row in store.db.execute("select answer_a, answer_b, context from comparisons") for v in row]
    export = tmp_path / "votes.jsonl"
    assert store.export_jsonl(export) > 0
    exported = export.read_text()
    # PPO's sampler stops only at end-of-turn ids: headers are sampled mid-answer there
    policy = service.engine.model
    eos = end_of_turn_ids(policy, tok)
    rollouts = generate_rollouts(policy, tok, [[{"role": "user", "content": "hi"}]] * 16, 24, eos_ids=eos, seed=0)
    sampled = set(rollouts.response_ids[rollouts.response_mask.bool()].tolist())
    assert sampled & (header_ids - set(eos)), "the test must sample a role header to mean anything"
    for text in [*texts, exported, *rollouts.texts]:
        assert not any(h in text for h in HEADERS), text


def test_a_template_without_system_role_answers_with_the_system_prompt_in_the_first_user_turn(gemma_dir, tmp_path):
    service = _service(gemma_dir, tmp_path / "data")
    tok = service.engine.tokenizer
    assert not chat_format(tok).system_role
    with pytest.raises(Exception, match="System role not supported"):  # the template itself refuses
        tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tokenize=False)
    session = ChatSession(system_prompt="Your name is Robo.")
    reply = _drain(service.chat(session, "what is your name?"))
    assert reply is not None and reply.version == 0
    prompt = tok.decode(render_prompt(tok, [{"role": "system", "content": "Your name is Robo."},
                                            {"role": "user", "content": "what is your name?"}]))
    assert "<start_of_turn>user\nYour name is Robo.\n\nwhat is your name?<end_of_turn>" in prompt
    assert prompt.count("<start_of_turn>") == 2  # folded, not a turn of its own


@pytest.mark.parametrize("family, ending", [("gemma", "<end_of_turn>\n"), ("llama3", "<|eot_id|>"),
                                             ("chatml", "<|im_end|>\n"), ("starter", "<|end|>")])
def test_the_reward_model_scores_the_end_of_turn_the_template_writes(family, ending, tmp_path):
    tok = load_tokenizer(build_tiny_model(tmp_path, family=family))
    prompt = [{"role": "user", "content": "hello there"}]
    ids, n_answer = answer_span(tok, prompt, "nice to meet you")
    tail = tok.decode(ids[-n_answer:])
    assert tail.endswith("nice to meet you" + ending), tail
    assert tok.eos_token not in tail.removesuffix(ending) or tok.eos_token in ending


def test_end_of_turn_stops_generation_even_when_the_generation_config_names_only_eos(gemma_dir):
    model, tok = load_model_and_tokenizer(gemma_dir)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in end_of_turn_ids(model, tok)


def test_chat_template_file_serves_a_model_without_one(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model", family="gemma")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model_dir.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(ModelLoadError, match="--chat-template"):
        load_tokenizer(model_dir)
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    service = _service(model_dir, tmp_path / "data", chat_template=template)
    assert _drain(service.chat(ChatSession(), "hello there")) is not None
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content ")
    with pytest.raises(ModelLoadError, match="broken.jinja"):
        load_tokenizer(model_dir, chat_template=broken)
    with pytest.raises(ModelLoadError, match="missing.jinja"):
        load_tokenizer(model_dir, chat_template=tmp_path / "missing.jinja")
