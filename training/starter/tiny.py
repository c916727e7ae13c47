"""Tiny random-weight causal LMs with a real tokenizer and chat template, for tests and benchmarks.

``build_tiny_model(DIR)`` trains a byte-level BPE tokenizer (the starter's, with its chat
template) on a few sentences and saves a 2-layer Llama from a config with random weights, with
``save_pretrained``: a directory that loads through the same path as a hub model, in a second.

``family=`` gives the tokenizer another family's chat template and special tokens instead, as
their hub tokenizers define them (:data:`FAMILIES`): ``"chatml"`` (SmolLM2, Qwen2.5),
``"llama3"`` (role headers and ``<|eot_id|>`` are added tokens flagged special, *not* in
``all_special_ids``; eos is ``<|end_of_text|>``) and ``"gemma"`` (no system role: the template
raises; turns end ``<end_of_turn>\n``, eos is ``<eos>``).
"""

from __future__ import annotations

import torch

TINY_TEXTS = [
    "hello there, how are you today?",
    "what is 12 plus 30? it is 42.",
    "the capital of France is Paris.",
    "the capital of Japan is Tokyo.",
    "spell cat backwards: tac.",
    "my name is Ada. nice to meet you, Ada!",
    "I don't know, sorry.",
] * 20


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# family -> chat template, (bos, eos, pad) (None: the family has none), turn tokens that the
# hub tokenizer adds as special *added* tokens only (not in its special-tokens map)
FAMILIES = {
    "starter": (None, (None, None, None), ()),
    "chatml": (CHATML_TEMPLATE, (None, "<|im_end|>", "<|endoftext|>"), ("<|im_start|>",)),
    "llama3": (LLAMA3_TEMPLATE, ("<|begin_of_text|>", "<|end_of_text|>", None),
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": (GEMMA_TEMPLATE, ("<bos>", "<eos>", "<pad>"), ("<start_of_turn>", "<end_of_turn>")),
}


def family_tokenizer(family: str = "starter", vocab_size: int = 320, texts=None):
    """A byte-level BPE tokenizer trained on ``texts`` (default ``TINY_TEXTS``) with the chat
    template and special tokens of ``family`` (:data:`FAMILIES`).

    Raises:
        KeyError: an unknown family.
    """
    from tokenizers import AddedToken

    from training.starter.tokenizer import train_tokenizer

    template, (bos, eos, pad), turn_tokens = FAMILIES[family]
    tok = train_tokenizer(TINY_TEXTS if texts is None else texts, vocab_size=vocab_size)
    if template is None:
        return tok
    named = [t for t in (bos, eos, pad) if t is not None]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (*named, *turn_tokens)])
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    tok.chat_template = template
    return tok


def build_tiny_model(out_dir, seed: int = 0, vocab_size: int = 320, hidden: int = 32, layers: int = 2,
                     family: str = "starter"):
    """Train a tokenizer on ``TINY_TEXTS`` and save a random-init tiny Llama to ``out_dir``,
    with the chat template and special tokens of ``family`` (:data:`FAMILIES`).

    Returns ``out_dir`` (a directory ``AutoModelForCausalLM.from_pretrained`` loads).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = family_tokenizer(family, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


