"""Turning generated token ids into the text a person sees.

Policy (deliberate, tested in ``tests/test_engine_text.py``):

* **Stops.** A reply ends at any end-of-turn id the generation config names
  (:func:`training.chat_format.end_of_turn_ids`) *and* at any special token the chat template itself
  emits (bos, role headers such as ``<|user|>``, ``<|start_header_id|>``, ``<|im_start|>``): a
  model that starts writing the next turn has finished this one. The stopping token is never shown.
* **Other special tokens** (pad, unknown, tool tokens …: every id
  :func:`training.chat_format.special_ids` names, added tokens flagged special included) are
  dropped from the text, never shown.
* **Reasoning.** ``<think>…</think>`` blocks are reasoning, not the answer: they are removed from
  the streamed text, from the stored answer and therefore from what is voted on and from the
  context of the next turn; :class:`ReplyText` keeps them apart as ``reasoning``. An unclosed
  ``<think>`` hides the rest of the reply (still thinking); a ``</think>`` with no opening tag
  (templates that open the block in the prompt) hides everything before it. The tags work both
  as plain text and as special tokens.
"""

from __future__ import annotations

import re

from training.chat_format import chat_format

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BLOCK = re.compile(re.escape(THINK_OPEN) + r"(.*?)" + re.escape(THINK_CLOSE), re.DOTALL)


def template_special_ids(tokenizer) -> set[int]:
    """Special token ids that the chat template emits (bos, role headers, end of turn;
    :attr:`training.chat_format.ChatFormat.template_ids`); ``<think>`` tags are never included."""
    return set(chat_format(tokenizer).template_ids) - think_ids(tokenizer)


def think_ids(tokenizer) -> set[int]:
    """Ids of ``<think>`` / ``</think>`` where the vocabulary has them as single tokens."""
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in (THINK_OPEN, THINK_CLOSE) if t in vocab}


def split_reasoning(text: str, partial: bool = True) -> tuple[str, str]:
    """``(answer, reasoning)`` of a reply.

    ``answer`` has every ``<think>…</think>`` block removed, an unclosed trailing block hidden
    and leading whitespace stripped; with ``partial`` (a reply still streaming) a trailing partial
    ``<think>`` tag such as ``"<th"`` is held back too, so streamed answers only ever grow.
    ``reasoning`` is the removed blocks' content, joined by newlines.
    """
    reasoning = [m.group(1).strip() for m in _BLOCK.finditer(text)]
    answer = _BLOCK.sub("", text)
    if THINK_CLOSE in answer:  # the block was opened by the prompt
        head, _, answer = answer.partition(THINK_CLOSE)
        reasoning.insert(0, head.strip())
    if THINK_OPEN in answer:  # still thinking
        answer, _, rest = answer.partition(THINK_OPEN)
        reasoning.append(rest.strip())
    for k in range(len(THINK_OPEN) - 1, 0, -1) if partial else ():  # hold back "<", "<t", … "<think"
        if answer.endswith(THINK_OPEN[:k]):
            answer = answer[:-k]
            break
    return answer.lstrip(), "\n".join(r for r in reasoning if r)


class ReplyText:
    """Incremental detokenizer for one reply.

    Feed it generated ids one at a time with :meth:`add`; :attr:`raw` is the decoded text so far
    (special tokens other than ``<think>`` tags removed, incomplete UTF-8 held back) and
    :attr:`answer` the part shown to a person (see :func:`split_reasoning`). Decoding keeps a
    short window (the usual prefix/read offsets), so a step costs O(1) tokens, not O(reply).

    Args:
        tokenizer: the model's tokenizer.
        hidden_ids: ids never rendered (default: every special id except ``<think>`` tags).
    """

    def __init__(self, tokenizer, hidden_ids: set[int] | None = None):
        self.tokenizer = tokenizer
        self.hidden = set(chat_format(tokenizer).special_ids) - think_ids(tokenizer) if hidden_ids is None else hidden_ids
        self.ids: list[int] = []  # visible ids (hidden ones dropped)
        self.raw = ""
        self._prefix = 0  # ids[_prefix:_read] were decoded already, as context for the next piece
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        """Append one generated id; True when :attr:`raw` grew."""
        if token_id in self.hidden:
            return False
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.raw += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            return True
        return False

    def finish(self) -> str:
        """The whole raw text, incomplete trailing bytes included (called once, at the end)."""
        tail = self._decode(self.ids[self._prefix:])
        before = self._decode(self.ids[self._prefix:self._read])
        if len(tail) > len(before):
            self.raw += tail[len(before):]
            self._prefix = self._read = len(self.ids)
        return self.raw

    @property
    def answer(self) -> str:
        """What a person sees so far: :attr:`raw` without reasoning (see :func:`split_reasoning`)."""
        return split_reasoning(self.raw)[0]

    @property
    def reasoning(self) -> str:
        return split_reasoning(self.raw)[1]
