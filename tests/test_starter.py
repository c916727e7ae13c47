"""The starter model pipeline: corpus, tokenizer, SFT labels, packing, tiny builds, ensure_starter."""

from __future__ import annotations

import json

import pytest
import torch

from training.flags import parse_config
from training.sft import (
    IGNORE,
    encode_conversation,
    pack,
)
from training.starter import corpus, vocab
from training.starter.build import StarterConfig, build_starter, ensure_starter
from training.starter.tokenizer import train_tokenizer

# A build that takes seconds: one tiny layer, ~150 steps (enough to learn to end its turns).
TINY = dict(vocab_size=400, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
            max_position_embeddings=256, n_documents=200, n_conversations=600, seq_len=128,
            batch_size=8, pretrain_steps=5, sft_steps=150, pretrain_lr=1e-2, sft_lr=1e-2,
            eval_per_skill=1, num_threads=1)
CHEAP = TINY | {"sft_steps": 5, "eval_per_skill": 0}  # builds whose quality does not matter

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "Sure! 12 plus 30 is 42."},
    {"role": "user", "content": "Spell cat backwards."},
    {"role": "assistant", "content": "tac."},
]


@pytest.fixture(scope="module")
def tok():
    convs = corpus.generate_conversations(0, 300)
    return train_tokenizer(corpus.generate_documents(0, 300) + [m["content"] for c in convs for m in c["messages"]], 400)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    return build_starter(tmp_path_factory.mktemp("tiny") / "starter", StarterConfig(**TINY), progress=False)


# ------------------------------------------------------------------ corpus ---------------------
def test_corpus_is_deterministic_for_a_seed():
    assert corpus.generate_conversations(3, 50) == corpus.generate_conversations(3, 50)
    assert corpus.generate_documents(3, 50) == corpus.generate_documents(3, 50)
    assert corpus.heldout_prompts(3, 12) == corpus.heldout_prompts(3, 12)
    assert corpus.generate_conversations(3, 50) != corpus.generate_conversations(4, 50)


def test_corpus_covers_skills_and_styles_and_replies_are_well_formed():
    convs = corpus.generate_conversations(0, 600)
    assert {c["skill"] for c in convs} == set(corpus.SKILLS) and len(corpus.SKILLS) >= 6
    styles = set()
    for c in convs:
        reply = c["messages"][-1]
        assert reply["role"] == "assistant" and reply["content"] in c["answers"]
        if c["skill"] not in ("small_talk", "unknown", "system"):
            assert c["reference"] in reply["content"]
        styles.add(c["answers"][reply["content"]])
    assert styles == set(corpus.STYLES)
    memory = [c for c in convs if c["skill"] == "memory"]
    assert all(len([m for m in c["messages"] if m["role"] == "user"]) >= 3 for c in memory)
    # a stated name, pet or town is said back at once (the first copy, right after it was typed)
    named = [c for c in memory if not c["reference"].isdigit() and c["reference"] not in vocab.COLOURS]
    assert named and all(next(m for m in c["messages"] if m["role"] == "assistant")["content"].count(c["reference"])
                         for c in named)


def test_heldout_prompts_use_phrasings_never_trained_on():
    train_questions = {m["content"] for c in corpus.generate_conversations(0, 5000)
                       for m in c["messages"] if m["role"] == "user"}
    held = corpus.heldout_prompts(0, 120)
    assert {h["skill"] for h in held} == set(corpus.SKILLS)
    for h in held:
        assert set(h) >= {"messages", "skill", "reference", "answers"}
        assert h["messages"][-1]["role"] == "user"
        assert h["messages"][-1]["content"] not in train_questions


def test_system_prompt_answers_obey_the_system_prompt():
    convs = [c for c in corpus.generate_conversations(1, 3000) if c["skill"] == "system"]
    assert {c["mode"] for c in convs} == {"name", "persona", "plain", *corpus.STYLES}
    for c in convs + corpus.system_prompts(1, 300):
        system, question = c["messages"][0], c["messages"][1]
        assert system["role"] == "system" and question["role"] == "user" and c["answers"]
        if c["mode"] in corpus.STYLES:  # a style prompt: only answers in that style count
            assert set(c["answers"].values()) == {c["mode"]}
        elif c["mode"] == "persona":  # every answer opens as the persona named in the prompt
            [persona] = [p for p in vocab.PERSONAS if p in system["content"]]
            assert all(a.startswith(vocab.PERSONAS[persona]) for a in c["answers"])
        elif c["mode"] == "name" and c["reference"] in system["content"]:
            assert all(c["reference"] in a for a in c["answers"])  # asked its name: the given one
    named = [c for c in convs if c["mode"] == "name" and c["reference"] in c["messages"][0]["content"]]
    assert len(named) > 50


def test_heldout_system_prompts_are_new_combinations_never_trained_on():
    train = {c["messages"][0]["content"] for c in corpus.generate_conversations(0, 5000) if c["skill"] == "system"}
    for kind, keys in vocab.SYSTEM_KEYS.items():
        trained, held = vocab.system_prompt_texts(kind, False), vocab.system_prompt_texts(kind, True)
        assert held and set(trained).isdisjoint(held)
        for key in keys:  # every key phrase is trained (in other carriers)
            assert any(key.lower() in t.lower() for t in trained), key
    held_items = corpus.system_prompts(0, 200)
    assert {c["mode"] for c in held_items} >= set(corpus.STYLES)
    assert not {c["messages"][0]["content"] for c in held_items} & train


def test_unseen_names_never_occur_in_training_text():
    import re

    convs = corpus.generate_conversations(0, 5000)
    text = " ".join(m["content"] for c in convs for m in c["messages"]) + " ".join(corpus.generate_documents(0, 3000))
    words = set(re.findall(r"[A-Za-z]+", text))
    assert not words & set(vocab.HELDOUT_NAMES)
    unseen = corpus.unseen_name_prompts(0, 200)
    refs = [u["reference"] for u in unseen]
    assert len(set(refs)) > 100 and not set(refs) & words  # recall of names the model never saw
    for u in unseen:  # stated in the conversation, asked for at the end, in a training phrasing
        assert u["reference"] in u["messages"][0]["content"] + u["messages"][1]["content"]
        assert all(u["reference"] in a for a in u["answers"])


# ------------------------------------------------------------------ tokenizer and labels -------
@pytest.mark.parametrize("text", ["What is 12 plus 30? It is 42.", "café ☕ naïve — 1234567890", "  two  spaces\nnew line"])
def test_tokenizer_round_trips_text_and_splits_digits(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    digit_tokens = [t for t in tok.convert_ids_to_tokens(tok("x 9876", add_special_tokens=False)["input_ids"])
                    if any(ch.isdigit() for ch in t)]
    assert digit_tokens == ["9", "8", "7", "6"]


def test_chat_template_renders_roles_and_generation_prompt(tok):
    text = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(tok.bos_token)
    assert text.index("<|system|>Be brief.<|end|>") < text.index("<|user|>What is 12 plus 30?<|end|>")
    assert text.endswith("<|assistant|>")


def test_sft_labels_keep_only_assistant_tokens_and_end_of_turn(tok):
    ids, labels = encode_conversation(tok, CONVERSATION)
    assert len(ids) == len(labels)
    kept = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    end = tok.convert_tokens_to_ids("<|end|>")
    assert tok.decode(kept, skip_special_tokens=False) == "Sure! 12 plus 30 is 42.<|end|>tac.<|end|>"
    assert kept.count(end) == 2  # one end-of-turn per assistant turn is learnt
    ignored = tok.decode([i for i, label in zip(ids, labels, strict=True) if label == IGNORE], skip_special_tokens=False)
    assert "Be brief." in ignored and "What is 12 plus 30?" in ignored and "<|assistant|>" in ignored


def test_sft_labels_without_generation_marks_match(tok):
    """A hub-style template without {% generation %} gives the same labels (prefix method)."""
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert encode_conversation(plain, CONVERSATION) == encode_conversation(tok, CONVERSATION)


def test_packing_restarts_positions_and_isolates_examples(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = encode_conversation(tok, CONVERSATION[1:3])
    b = encode_conversation(tok, CONVERSATION[3:5])
    rows = pack([a, b], seq_len=len(a[0]) + len(b[0]) + 3, pad_id=tok.pad_token_id, seed=0)  # (1, 3, T)
    assert rows.shape[:2] == (1, 3)
    ids, pos = rows[0, 0], rows[0, 2]
    assert (pos == 0).sum() == 3  # two examples + the padding tail
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    model.eval()
    first = ids[: len(a[0])].tolist()
    second_start = (pos[1:] == 0).nonzero()[0].item() + 1
    second = ids[second_start : second_start + len(b[0])].tolist()
    with torch.no_grad():
        packed = model(input_ids=rows[:, 0], position_ids=rows[:, 2], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(packed[second_start : second_start + len(second)], alone, atol=1e-4, rtol=1e-4)
    assert sorted([first, second]) == sorted([a[0], b[0]])


# ------------------------------------------------------------------ config and CLI -------------
@pytest.mark.parametrize("bad", [dict(hidden_size=0), dict(hidden_size=30, num_heads=4), dict(vocab_size=100),
                                 dict(seq_len=1024, max_position_embeddings=512), dict(sft_lr=2.0),
                                 dict(pretrain_steps=-1)])
def test_starter_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        StarterConfig(**bad)


def test_cli_flags_are_generated_from_the_config():
    cfg = parse_config(StarterConfig, ["--hidden-size", "64", "--sft-lr", "0.01"])
    assert (cfg.hidden_size, cfg.sft_lr, cfg.num_layers) == (64, 0.01, StarterConfig().num_layers)


# ------------------------------------------------------------------ tiny builds ----------------
def test_tiny_build_loads_like_a_hub_model_and_stops_at_end_of_turn(tiny_build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.chat_format import render_prompt
    from training.models import load_model_and_tokenizer

    info = json.loads((tiny_build / "starter.json").read_text())
    assert info["seed"] == TINY.get("seed", 0) and info["config"]["hidden_size"] == TINY["hidden_size"]
    assert "sft/loss" in info["metrics"]
    assert not [p for p in tiny_build.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    model = AutoModelForCausalLM.from_pretrained(tiny_build)
    tok = AutoTokenizer.from_pretrained(tiny_build)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert model.generation_config.eos_token_id == end and model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.max_position_embeddings == TINY["max_position_embeddings"]
    model, tok = load_model_and_tokenizer(tiny_build)
    stopped = 0
    for item in corpus.eval_prompts(7, 2):
        prompt = torch.tensor([render_prompt(tok, item["messages"])])
        out = model.generate(prompt, max_new_tokens=40, do_sample=False)[0, prompt.shape[1]:].tolist()
        stopped += end in out and out.index(end) == len(out) - 1
    assert stopped >= 6  # of 12: even this tiny model has learnt to end most replies itself


def test_build_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    def weights(name, **changes):
        out = build_starter(tmp_path / name, StarterConfig(**(CHEAP | changes)), progress=False)
        return load_file(out / "model.safetensors")

    first, second, other = weights("a"), weights("b"), weights("c", seed=1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if k in other)


def test_ensure_starter_reuses_a_good_cache_and_rebuilds_a_corrupt_one(tmp_path, capsys):
    cfg = StarterConfig(**CHEAP)
    out = ensure_starter(tmp_path / "starter", cfg, progress=False)
    assert out == tmp_path / "starter" and "missing" in capsys.readouterr().out
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_starter(tmp_path / "starter", cfg, progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp and capsys.readouterr().out == ""
    # built with an older recipe: kept as it is (adapters were trained on it), with a note
    assert ensure_starter(tmp_path / "starter", StarterConfig(**(CHEAP | {"sft_steps": 7, "num_threads": 1})), progress=False) == out
    note = capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert "sft_steps=5" in note and "sft_steps=7" in note and "num_threads" not in note
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    ensure_starter(tmp_path / "starter", cfg, progress=False)
    message = capsys.readouterr().out
    assert "corrupt" in message and len(message.strip().splitlines()) == 1
    from training.models import load_model_and_tokenizer

    load_model_and_tokenizer(out)  # loads again
    (out / "starter.json").unlink()
    ensure_starter(tmp_path / "starter", cfg, progress=False)
    assert "incomplete" in capsys.readouterr().out and (out / "starter.json").is_file()
