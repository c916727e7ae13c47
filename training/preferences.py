"""Preference pairs for the reward model: tokenising, the held-out split by conversation, and
reading TRL's conversational preference JSONL (what ``python -m storage export`` writes).

A pair is ``{"conversation_id", "prompt": [messages], "chosen": str, "rejected": str, "tie": bool}``;
encoded, it also carries how many trailing tokens of each sequence are the answer (the span the
reward model's reference features are read over).
Pairs whose two texts are identical carry no information and are dropped; so are pairs marked
``both_bad`` (stored by the app, left out of the loss).
"""

from __future__ import annotations

import hashlib
import json

from training.chat_format import chat_format, render_conversation, render_prompt
from training.seeds import derive_seed


def answer_span(
    tokenizer, prompt: list[dict], answer: str, max_length: int | None = None,
    prompt_ids: list[int] | None = None,
) -> tuple[list[int], int]:
    """Token ids of ``prompt`` with ``answer`` as an assistant turn, through the chat template,
    ending with the template's own end of turn (:attr:`training.chat_format.ChatFormat.end_of_turn`:
    ``<end_of_turn>\n`` for Gemma, ``<|im_end|>\n`` for ChatML; anything the template puts
    after it is cut, and it is appended if the template leaves it out), and how many trailing
    ids are the answer.

    The answer is what follows the longest common prefix with the prompt rendered with its
    generation prompt (the assistant header); end-of-turn included. Longer than
    ``max_length``: the front is cut, and the answer span keeps at least one token before it.
    ``prompt_ids``: that rendering when the caller already has it (``render_prompt(tokenizer,
    prompt)``; two answers to one prompt need it once).

    Returns:
        ``(ids, n_answer)`` with ``1 <= n_answer <= len(ids) - 1`` (``len(ids) >= 2``).
    """
    ids = render_conversation(tokenizer, list(prompt) + [{"role": "assistant", "content": answer}])
    shared = 0
    if prompt_ids is None:
        prompt_ids = render_prompt(tokenizer, prompt)
    for a, b in zip(prompt_ids, ids, strict=False):
        if a != b:
            break
        shared += 1
    end = list(chat_format(tokenizer).end_of_turn)
    if end:  # looked for after the prompt only: an earlier turn's end never cuts the answer off
        at = _last_index(ids[shared:], end)
        ids = ids[: shared + at + len(end)] if at is not None else ids + end
    n_answer = len(ids) - shared
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids, max(1, min(n_answer, len(ids) - 1))


def _last_index(ids: list[int], part: list[int]) -> int | None:
    """Where the last occurrence of ``part`` starts in ``ids`` (None: nowhere)."""
    for i in range(len(ids) - len(part), -1, -1):
        if ids[i:i + len(part)] == part:
            return i
    return None


def _usable(pair: dict) -> bool:
    return not pair.get("both_bad", False) and pair["chosen"].strip() != pair["rejected"].strip()


def encode_pairs(tokenizer, pairs: list[dict], max_length: int = 512) -> list[dict]:
    """Tokenise preference pairs; pairs with identical texts (or marked ``both_bad``) are dropped.

    Args:
        pairs: ``{"conversation_id", "prompt": [messages], "chosen": str, "rejected": str,
            "tie": bool}`` dicts.

    Returns:
        ``{"conversation_id", "chosen_ids", "rejected_ids", "chosen_answer_len",
        "rejected_answer_len", "tie"}`` dicts, in input order (``*_answer_len``: trailing ids
        that are the answer, see :func:`answer_span`).

    Raises:
        KeyError: a pair lacks one of the keys above (``tie`` defaults to False).
    """
    out = []
    for pair in pairs:
        if not _usable(pair):
            continue
        prompt_ids = render_prompt(tokenizer, pair["prompt"])
        chosen, n_chosen = answer_span(tokenizer, pair["prompt"], pair["chosen"], max_length, prompt_ids)
        rejected, n_rejected = answer_span(tokenizer, pair["prompt"], pair["rejected"], max_length, prompt_ids)
        out.append({
            "conversation_id": str(pair["conversation_id"]),
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "chosen_answer_len": n_chosen,
            "rejected_answer_len": n_rejected,
            "tie": bool(pair.get("tie", False)),
        })
    return out


def _in_heldout(conversation_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_conversation(pairs: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split pairs into ``(train, heldout)`` by ``conversation_id``, never by row.

    A conversation is held out exactly when a hash of (seed, id), uniform in [0, 1), falls
    below ``heldout_fraction``: the split is deterministic, order-free, and a conversation keeps
    its side however much data arrives (no rule ever moves one to fill an empty side; with few
    conversations a side may be empty)."""
    if heldout_fraction <= 0:
        return list(pairs), []
    held = {c for c in {str(p["conversation_id"]) for p in pairs} if _in_heldout(c, seed) < heldout_fraction}
    train = [p for p in pairs if str(p["conversation_id"]) not in held]
    heldout = [p for p in pairs if str(p["conversation_id"]) in held]
    return train, heldout


def split_prompts(prompts: list[dict], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """Split ``{"conversation_id", "messages"}`` prompts by conversation (never by row) into
    PPO prompts and held-out gate prompts; both are lists of message lists. When a side would
    be empty, both use all prompts."""
    train, heldout = split_by_conversation(prompts, heldout_fraction, seed)
    train_msgs = [p["messages"] for p in train]
    heldout_msgs = [p["messages"] for p in heldout]
    if not train_msgs or not heldout_msgs:
        everything = [p["messages"] for p in prompts]
        return everything, everything
    return train_msgs, heldout_msgs


def split_heldout(heldout: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """The held-out pairs of :func:`split_by_conversation` (same fraction and seed) in two halves
    by the same hash, ``(select, judge)``: *select* picks among reward models, *judge* measures
    the one picked (its accuracy on the votes it was selected on would be biased upwards).
    Stable as data grows, like the split itself."""
    judge = {c for c in {str(p["conversation_id"]) for p in heldout}
             if _in_heldout(c, seed) < heldout_fraction / 2}
    return ([p for p in heldout if str(p["conversation_id"]) not in judge],
            [p for p in heldout if str(p["conversation_id"]) in judge])


def conversation_folds(pairs: list[dict], folds: int, seed: int) -> list[int]:
    """The cross-validation fold (0 … ``folds`` − 1) of each pair, by a hash of its
    ``conversation_id`` (another hash than the held-out split's): one conversation is always in
    one fold, and keeps it as data grows.

    Raises:
        ValueError: ``folds`` < 2.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    fold_seed = derive_seed(seed, "cv-folds")
    return [min(int(_in_heldout(str(p["conversation_id"]), fold_seed) * folds), folds - 1) for p in pairs]


def _text(value) -> str:
    """An answer given as a string or as TRL's list of messages (the last message's content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    raise ValueError(f"an answer must be a string or a list of messages, got {type(value).__name__}")


def load_pairs_jsonl(path) -> list[dict]:
    """Read preference pairs, one JSON object a line: ``prompt`` (messages), ``chosen`` and
    ``rejected`` (strings or TRL's lists of messages), optional ``tie`` and
    ``conversation_id`` (default: a hash of the prompt's first message, so one conversation
    stays on one side of the held-out split).

    Raises:
        ValueError: a line is not valid JSON or lacks ``prompt``/``chosen``/``rejected``.
    """
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = row["prompt"]
                first = json.dumps(prompt[:1], sort_keys=True)
                pairs.append({
                    "conversation_id": str(row.get("conversation_id") or hashlib.sha1(first.encode()).hexdigest()),
                    "prompt": prompt, "chosen": _text(row["chosen"]), "rejected": _text(row["rejected"]),
                    "tie": bool(row.get("tie", False)),
                })
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: not a preference pair ({exc.__class__.__name__}: {exc}); "
                                 "expected {\"prompt\": [...], \"chosen\": ..., \"rejected\": ...}") from exc
    return pairs
