"""Byte-level BPE tokenizer with a chat template, for the starter model and for tests.

The tokenizer is trained with the Hugging Face ``tokenizers`` library and wrapped in a
``PreTrainedTokenizerFast`` so that ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
treat it exactly like a hub tokenizer.

Digits are split one per token (``pre_tokenizers.Digits(individual_digits=True)``) so that
arithmetic is learnt digit by digit rather than memorised per number.

Chat template: ``<|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>``. ``<|end|>``
is the end-of-turn token and the tokenizer's ``eos_token``; the assistant part is wrapped in
``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks
assistant tokens (the end-of-turn token included) for SFT loss masking.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, END, SYSTEM, USER, ASSISTANT]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and return it with the chat template set.

    Args:
        texts: training text, any iterable of strings (documents or rendered conversations).
        vocab_size: target vocabulary size in tokens, special tokens and the 256 byte
            symbols included. Must be > 256 + len(SPECIAL_TOKENS).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token``, ``bos_token``, ``eos_token``
        (= ``<|end|>``, the end-of-turn token) and ``chat_template`` set.

    Raises:
        ValueError: if ``vocab_size`` is too small to hold the byte alphabet and special tokens.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size must be > {minimum} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast
