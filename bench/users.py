"""Simulated users of the online benchmark: one turn of chat, comparison and vote through the
app's HTTP API (``gradio_client``)."""

from __future__ import annotations

import random


def user_turn(client, messages: list[dict], annotator, noise: float, rng: random.Random) -> tuple[str, bool]:
    """One simulated user turn: a new conversation, the earlier user turns as plain chat (the
    model's own replies continue it), the last user turn as a comparison, then the vote:
    ``annotator``'s, flipped with probability ``noise`` (1: always, the benchmark's adversarial
    spam voter). Returns ``(choice voted, flipped)``."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    client.predict(system, api_name="/new_conversation")
    context = [{"role": "system", "content": system}] if system else []
    users = [m["content"] for m in messages if m["role"] == "user"]
    for text in users[:-1]:
        *_, turn = client.predict(text, False, api_name="/send")  # turn: the raw texts
        reply = turn["reply"] or ""
        context += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    context.append({"role": "user", "content": users[-1]})
    *_, turn = client.predict(users[-1], True, api_name="/send")
    choice = annotator(context, turn["answer_a"] or "", turn["answer_b"] or "")
    flipped = rng.random() < noise
    if flipped:
        choice = {"a": "b", "b": "a"}.get(choice) or rng.choice("ab")
    client.predict(api_name=f"/vote_{choice}")
    return choice, flipped
