"""Tiny random-weight causal LMs with a real tokenizer and chat template, for tests and benchmarks.

``build_tiny_model(DIR)`` trains a byte-level BPE tokenizer (the starter's, with its chat
template) on a few sentences and saves a 2-layer Llama from a config with random weights, with
``save_pretrained``: a directory that loads through the same path as a hub model, in a second.
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


def build_tiny_model(out_dir, seed: int = 0, vocab_size: int = 320, hidden: int = 32, layers: int = 2):
    """Train a tokenizer on ``TINY_TEXTS`` and save a random-init tiny Llama to ``out_dir``.

    Returns ``out_dir`` (a directory ``AutoModelForCausalLM.from_pretrained`` loads).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.starter.tokenizer import train_tokenizer

    tok = train_tokenizer(TINY_TEXTS, vocab_size=vocab_size)
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


