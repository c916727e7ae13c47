"""The chat template, as serving, training and storage need it: the one owner of what a
template's tokens mean.

Every model family writes its turns differently (ChatML ``<|im_start|>…<|im_end|>\\n``,
Llama 3 ``<|start_header_id|>…<|end_header_id|>\\n\\n…<|eot_id|>``, Gemma
``<start_of_turn>…<end_of_turn>\\n``, the starter's ``<|user|>…<|end|>``). What the rest of the
code asks of a template is read from the template itself, never from a family list:

* :func:`special_ids` — every token the tokenizer flags special: ``all_special_ids`` *and* the
  added tokens marked ``special`` (Llama 3's role headers are only the latter). They never reach
  a reply, the database or an export.
* :func:`inert_text` — user-, system- or model-written text with every special token's spelling
  broken by a zero-width space (U+200B), so typing ``<|end|><|assistant|>`` never forges a turn:
  only the template writes role tokens. Applied to every message rendered here and to text
  before it is stored (so the export is inert too).
* :func:`template_messages` — a conversation the template accepts (contents made inert): a
  template that rejects (or silently drops) the system role gets the system prompt folded into
  the first user turn.
* :attr:`ChatFormat.end_of_turn` — the ids the template emits after an assistant's content
  (``<end_of_turn>\\n`` for Gemma, not ``<eos>``): what the reward model scores an answer with,
  and (its first id) a stop for generation.
* :func:`render_prompt` / :func:`render_conversation` — token ids through the template;
  :func:`decode_text` — generated ids back to text, special tokens left out.
* :func:`fit_messages` / :func:`fit_prompts` — drop the oldest whole turns until prompt +
  ``max_new_tokens`` fits the context window (serving, and a round's prompts alike).
* :func:`read_chat_template` — a Jinja template from a file (``--chat-template FILE``) for a
  model that has none.

Template semantics: transformers' ``apply_chat_template`` (https://huggingface.co/docs/transformers/chat_templating).
"""

from __future__ import annotations

import json
import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_PROBE_SYSTEM = "SYSPROBE7"  # a probe text that no template writes by itself
_PROBE_ANSWER = "ANSPROBE7"
MAX_TEMPLATE_BYTES = 1_000_000  # a chat template file larger than this is refused
ESCAPE = "\u200b"  # zero-width space: inserted after a special token's first character


class ChatTemplateError(ValueError):
    """A chat template file cannot be used (missing, unreadable, empty, too large, or it does not
    render a conversation); the message names the file and the flag."""


@dataclass(frozen=True)
class ChatFormat:
    """What a tokenizer's chat template does, read from it once (:func:`chat_format`).

    Attributes:
        special_ids: every token id the tokenizer flags special (see :func:`special_ids`).
        template_ids: the special ids the template itself emits around turns (bos, role
            headers, end of turn): a model that samples one has finished its turn.
        system_role: whether the template renders a system message as such.
        end_of_turn: the ids the template writes after an assistant message's content (may be
            empty for a template that writes nothing there; then the eos token stands in).
        special_pattern: a regex matching the text of any special token (two characters or
            more, longest first), or None when there is none.
    """

    special_ids: frozenset[int]
    template_ids: frozenset[int]
    system_role: bool
    end_of_turn: tuple[int, ...]
    special_pattern: re.Pattern | None = None


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (template, ChatFormat)


def special_ids(tokenizer) -> frozenset[int]:
    """Every special token id: ``tokenizer.all_special_ids`` plus each added token whose
    ``special`` flag is set (``added_tokens_decoder``)."""
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(i))
    return frozenset(ids)


def _special_pattern(tokenizer, ids: frozenset[int]) -> re.Pattern | None:
    """A regex of the spellings of ``ids`` (added tokens' content, else the vocabulary's
    token), longest first; single characters are left out (they cannot be broken)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = set()
    for i in ids:
        token = added.get(i)
        text = getattr(token, "content", None) or tokenizer.convert_ids_to_tokens(int(i))
        if isinstance(text, str) and len(text) > 1 and ESCAPE not in text:
            texts.add(text)
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=lambda t: (-len(t), t))))


def inert_text(tokenizer, text: str) -> str:
    """``text`` with every spelling of a special token of ``tokenizer`` broken by a zero-width
    space after its first character (``<|end|>`` → ``<\u200b|end|>``): it then tokenizes as
    ordinary text, looks the same, and cannot open, close or forge a turn. Text without such a
    spelling is returned unchanged; the result is a fixed point (applying it again changes
    nothing)."""
    pattern = chat_format(tokenizer).special_pattern
    if pattern is None or not text:
        return text
    while True:  # a break can complete an overlapping spelling ("<<|end|>|end|>"): repeat
        broken = pattern.sub(lambda m: m.group(0)[0] + ESCAPE + m.group(0)[1:], text)
        if broken == text:
            return text
        text = broken


def _ids(out) -> list[int]:
    """``apply_chat_template(..., tokenize=True)`` returns a list or a BatchEncoding."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def _accepts_system(tokenizer) -> bool:
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "u"}],
            add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a template raising for the system role is the answer
        return False
    return _PROBE_SYSTEM in text


def _end_of_turn(tokenizer) -> tuple[int, ...]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "u"}, {"role": "assistant", "content": _PROBE_ANSWER}],
        add_generation_prompt=False, tokenize=False)
    at = text.rfind(_PROBE_ANSWER)
    suffix = text[at + len(_PROBE_ANSWER):] if at >= 0 else ""
    ids = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return tuple(int(i) for i in ids)


def chat_format(tokenizer) -> ChatFormat:
    """The :class:`ChatFormat` of ``tokenizer``'s current chat template (probed once per
    tokenizer and template, then cached)."""
    template = getattr(tokenizer, "chat_template", None)
    cached = _FORMATS.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    system_role = _accepts_system(tokenizer)
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    if system_role:
        probe = [{"role": "system", "content": "s"}, *probe]
    rendered = set(_ids(tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=True)))
    special = special_ids(tokenizer)
    fmt = ChatFormat(special, frozenset(rendered & special), system_role, _end_of_turn(tokenizer),
                     _special_pattern(tokenizer, special))
    _FORMATS[tokenizer] = (template, fmt)
    return fmt


def template_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """``messages`` as the template accepts them, every content made inert
    (:func:`inert_text`): otherwise unchanged when it renders a system role; else a leading
    system message is folded into the first user turn as ``"{system}\\n\\n{user}"`` (dropped
    when no user turn follows)."""
    messages = [{**m, "content": inert_text(tokenizer, m["content"])} if isinstance(m.get("content"), str) else m
                for m in messages]
    if not messages or messages[0].get("role") != "system" or chat_format(tokenizer).system_role:
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{system}\n\n{m['content']}" if system else m["content"]}
            break
    return rest


def render_conversation(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` (``{"role", "content"}`` dicts, system folded where the
    template needs it) through the chat template."""
    return _ids(tokenizer.apply_chat_template(
        template_messages(tokenizer, messages), add_generation_prompt=add_generation_prompt, tokenize=True))


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, ending with the assistant
    header (``add_generation_prompt=True``): what the model continues."""
    return render_conversation(tokenizer, messages, add_generation_prompt=True)


def decode_text(tokenizer, ids) -> str:
    """The text of generated ``ids`` with every special token (:func:`special_ids`) left out:
    what is shown, stored, scored and exported."""
    hidden = chat_format(tokenizer).special_ids
    return tokenizer.decode([int(i) for i in ids if int(i) not in hidden], skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)


class ContextTooLongError(ValueError):
    """The newest user message alone (with the system prompt) does not fit the context window."""


def fit_messages(
    tokenizer, messages: list[dict], max_context_tokens: int, max_new_tokens: int
) -> list[dict]:
    """Drop the oldest whole turns until the rendered prompt + ``max_new_tokens`` fits.

    A turn is a user message and the assistant replies that follow it. A leading system message
    and the newest user turn are always kept. Counts use the real tokenizer and chat template.

    Args:
        messages: the conversation so far, ending with the user message to answer.
        max_context_tokens: the model's context window, in tokens.
        max_new_tokens: tokens reserved for the reply.

    Returns:
        The kept messages (a suffix of the turns, with the system message if any).

    Raises:
        ContextTooLongError: the system message plus the newest user turn alone do not fit.
    """
    budget = max_context_tokens - max_new_tokens
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
    for start in starts:
        kept = system + rest[start:]
        if len(render_prompt(tokenizer, kept)) <= budget:
            return kept
    n = len(render_prompt(tokenizer, system + rest[starts[-1]:]))
    raise ContextTooLongError(
        f"the message is too long: {n} tokens with the template, but only {budget} fit "
        f"({max_context_tokens}-token window minus {max_new_tokens} for the reply). "
        "Shorten it or start a new conversation."
    )


def fit_prompts(
    tokenizer, prompts: list[list[dict]], max_context_tokens: int, max_new_tokens: int
) -> list[list[dict]]:
    """The rule of :func:`fit_messages` for a batch of prompts (training rounds, gates): each
    conversation loses its oldest whole turns until it fits; one whose newest message alone does
    not fit is left out (logged), so a round never feeds the model more than its window.

    Returns:
        The fitted prompts, in order, without the ones that cannot fit.
    """
    fitted = []
    for messages in prompts:
        try:
            fitted.append(fit_messages(tokenizer, messages, max_context_tokens, max_new_tokens))
        except ContextTooLongError as exc:
            log.info("prompt left out: %s", exc)
    return fitted


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """Every token id that ends an assistant turn, deduplicated, in this order: the generation
    config's eos ids, the tokenizer's eos token, and the first id of the template's own end of
    turn (:attr:`ChatFormat.end_of_turn`) when it is a special token. ``model`` None (served
    elsewhere, e.g. by vLLM, which applies the generation config itself): the tokenizer's alone."""
    ids: list[int] = []
    eos = model.generation_config.eos_token_id if model is not None else None
    fmt = chat_format(tokenizer)
    first = fmt.end_of_turn[:1] if fmt.end_of_turn and fmt.end_of_turn[0] in fmt.special_ids else ()
    for i in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id, *first]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def read_chat_template(path: str | Path) -> str:
    """The Jinja chat template in the file ``path`` (``--chat-template FILE``).

    A ``.json`` file may hold ``{"chat_template": "..."}`` (a ``tokenizer_config.json``).

    Raises:
        ChatTemplateError: the file is missing, unreadable, larger than ``MAX_TEMPLATE_BYTES``,
            empty, or a JSON file without a ``chat_template`` string.
    """
    p = Path(path).expanduser()
    try:
        if p.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ChatTemplateError(f"--chat-template {path}: larger than {MAX_TEMPLATE_BYTES} bytes")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"--chat-template {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    if p.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise ChatTemplateError(f"--chat-template {path}: a .json file must hold {{\"chat_template\": \"...\"}}") from None
        if not isinstance(text, str):
            raise ChatTemplateError(f"--chat-template {path}: chat_template must be a string")
    if not text.strip():
        raise ChatTemplateError(f"--chat-template {path}: the file is empty")
    return text


def check_template(tokenizer, source: str) -> None:
    """Render a two-turn probe conversation with ``tokenizer``'s template.

    Raises:
        ChatTemplateError: the template fails to render it (the message names ``source``).
    """
    try:
        chat_format(tokenizer)
        render_prompt(tokenizer, [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                                  {"role": "user", "content": "v"}])
    except Exception as exc:  # noqa: BLE001 - any template error becomes one clear message
        raise ChatTemplateError(
            f"the chat template of {source} does not render a conversation "
            f"({exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
