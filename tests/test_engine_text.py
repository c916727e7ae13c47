"""Stopping, template tokens, <think> handling and the context window, through ChatEngine on the
tiny model. A logits hook makes the real model emit chosen tokens at chosen steps (header
tokens, pad, a second end-of-turn id, <think> blocks)."""

from __future__ import annotations

import pytest

from chatapp.engine import Sampling
from chatapp.text import ReplyText, split_reasoning, template_special_ids
from tests.test_engine import PROMPTS, greedy, make_engine, msgs
from training.chat_format import ContextTooLongError


class Script:
    """Forces token ``ids[k]`` at generation step ``k`` (step 0 = the prefill's token)."""

    def __init__(self, engine, ids: list[int | None]):
        self.ids, self.step = list(ids), 0
        self.handle = engine.model.get_base_model().lm_head.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        tok = self.ids[self.step] if self.step < len(self.ids) else None
        self.step += 1
        if tok is not None:
            out = out.clone()
            out[..., tok] += 1e4
        return out

    def remove(self):
        self.handle.remove()


def run(engine, script, sampling, prompt=PROMPTS[1]):
    hook = Script(engine, script)
    try:
        gen = engine.stream(msgs(prompt), sampling)
        pieces = []
        while True:
            try:
                pieces.append(next(gen))
            except StopIteration as done:
                return pieces, done.value
    finally:
        hook.remove()


@pytest.fixture
def engine(tiny_model_dir, tmp_path):
    return make_engine(tiny_model_dir, tmp_path / "data")


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


SPECIALS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>", "<|bos|>"]


def test_template_special_ids_are_the_headers(engine):
    tok = engine.tokenizer
    names = {tok.convert_ids_to_tokens(i) for i in template_special_ids(tok)}
    assert names == {"<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    assert engine.stop_ids >= template_special_ids(tok) and tok.eos_token_id in engine.stop_ids


@pytest.mark.parametrize("header", ["<|user|>", "<|assistant|>", "<|system|>", "<|bos|>"])
def test_header_token_ends_the_reply_and_is_never_shown(engine, header):
    tok = engine.tokenizer
    hello = ids_of(tok, " hello")
    pieces, reply = run(engine, hello + [tok.convert_tokens_to_ids(header)] + hello, Sampling(temperature=0, max_new_tokens=30))
    assert reply.finish == "eos" and not reply.stopped
    assert reply.tokens == hello
    assert reply.text == "hello"
    assert not any(s in p for p in pieces + [reply.text] for s in SPECIALS)


def test_pad_and_other_special_tokens_are_dropped_not_stopped(engine):
    tok = engine.tokenizer
    hi = ids_of(tok, "hi")
    script = hi + [tok.pad_token_id] + hi + [tok.eos_token_id]
    pieces, reply = run(engine, script, Sampling(temperature=0, max_new_tokens=30))
    assert reply.finish == "eos" and reply.text == "hihi"
    assert not any("<|" in p for p in pieces)
    assert all(pieces[i + 1].startswith(pieces[i]) for i in range(len(pieces) - 1))


def test_every_generation_config_end_of_turn_id_stops(tiny_model_dir, tmp_path):
    """A model whose generation config names two end-of-turn ids stops on the second as well."""
    from chatapp.engine import ChatEngine
    from storage.paths import DataDir
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from training.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    dot = ids_of(tok, ".")[0]
    model.generation_config.eos_token_id = [tok.eos_token_id, dot]
    store = open_store(tmp_path / "d")
    engine = ChatEngine(model, tok, AdapterRegistry(DataDir(tmp_path / "d"), store))
    assert dot in engine.stop_ids
    hello = ids_of(tok, "hello")
    _, reply = run(engine, hello + [dot] + hello, Sampling(temperature=0, max_new_tokens=30))
    assert reply.finish == "eos" and reply.tokens == hello and reply.text == "hello"


def test_min_new_tokens_suppresses_end_of_turn(engine):
    tok = engine.tokenizer
    _, reply = run(engine, [tok.eos_token_id] * 3, greedy(12))
    assert reply.finish == "length" and len(reply.tokens) == 12
    assert tok.eos_token_id not in reply.tokens


def test_think_block_is_removed_from_stream_and_answer(engine):
    tok = engine.tokenizer
    script = ids_of(tok, "<think>plan: be brief</think> Paris.") + [tok.eos_token_id]
    pieces, reply = run(engine, script, Sampling(temperature=0, max_new_tokens=60))
    assert reply.text == "Paris." and reply.reasoning == "plan: be brief"
    assert not any("think" in p or "plan" in p or "<" in p for p in pieces)
    assert pieces[-1] == "Paris."


def test_unclosed_think_hides_the_rest(engine):
    tok = engine.tokenizer
    script = ids_of(tok, "ok <think>still going") + [tok.eos_token_id]
    pieces, reply = run(engine, script, Sampling(temperature=0, max_new_tokens=60))
    assert reply.text == "ok" and reply.reasoning == "still going"
    assert all("going" not in p for p in pieces)


@pytest.mark.parametrize(
    "text, answer, reasoning",
    [
        ("a<think>x</think>b<think>y</think>c", "abc", "x\ny"),
        ("prompt-opened reasoning</think>\n\nanswer", "answer", "prompt-opened reasoning"),
        ("2 < 3", "2 < 3", ""),
        ("literal <thin", "literal <thin", ""),
    ],
)
def test_split_reasoning_final(text, answer, reasoning):
    assert split_reasoning(text, partial=False) == (answer, reasoning)


def test_split_reasoning_holds_back_partial_tag_while_streaming():
    assert split_reasoning("answer <thi")[0] == "answer "
    assert split_reasoning("answer <", partial=True)[0] == "answer "


def test_reply_text_never_splits_a_character(engine):
    tok = engine.tokenizer
    text = ReplyText(tok)
    shown = []
    for i in ids_of(tok, "héllo wörld ✓ 日本"):
        if text.add(i):
            shown.append(text.raw)
    assert text.finish() == "héllo wörld ✓ 日本"
    assert all("\ufffd" not in s for s in shown)


def test_long_conversation_drops_oldest_turns_and_fits_the_window(engine):
    conversation = []
    for i in range(30):
        conversation += [
            {"role": "user", "content": f"question number {i} " * 2},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    conversation.append({"role": "user", "content": "newest question"})
    sampling = greedy(64)
    ids = engine.prompt_ids(conversation, sampling.max_new_tokens)
    assert len(ids) + 64 <= engine.window
    shown = engine.tokenizer.decode(ids)
    assert "question number 0 " not in shown and "newest question" in shown
    reply = engine.reply(conversation, sampling)
    assert len(reply.tokens) == 64 and reply.finish == "length"


def test_too_long_message_is_a_clear_error_and_serving_goes_on(engine):
    with pytest.raises(ContextTooLongError, match="too long"):
        engine.reply(msgs("word " * 400), greedy(8))
    with pytest.raises(ContextTooLongError):  # the reply alone is larger than the window
        engine.reply(msgs("hi"), Sampling(max_new_tokens=engine.window + 1))
    assert len(engine.reply(msgs("hi"), greedy(8)).tokens) == 8


def test_fit_prompts_applies_the_serving_rule_to_training_prompts(engine):
    from training.chat_format import fit_messages, fit_prompts, render_prompt

    tok = engine.tokenizer
    long_history = []
    for i in range(30):
        long_history += [{"role": "user", "content": f"q{i} " * 3}, {"role": "assistant", "content": f"a{i}"}]
    long_history.append({"role": "user", "content": "last"})
    prompts = [msgs("short"), long_history, msgs("word " * 400)]
    fitted = fit_prompts(tok, prompts, engine.window, 48)
    assert len(fitted) == 2  # the one that cannot fit is left out
    assert fitted[0] == prompts[0]
    assert fitted[1] == fit_messages(tok, long_history, engine.window, 48) != long_history
    assert all(len(render_prompt(tok, p)) + 48 <= engine.window for p in fitted)
