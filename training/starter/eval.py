"""Evaluate a starter (or any chat) model on freshly generated conversations.

Run: ``python -m training.starter.eval --model data/starter --json eval.json``

Figures (each a fraction in [0, 1]):

* ``per_skill`` — greedy **exact-match** per skill on fresh prompts in training phrasings
  (new values and contexts, drawn with a seed the build never uses). A reply is an exact match
  when it ends with the end-of-turn token within ``max_new_tokens`` and, stripped of outer
  whitespace, is *exactly one of the well-formed answers* of the prompt: the correct value
  (sum, capital, spelling, remembered name…) rendered in one of the four answer styles (terse,
  short explanation, friendly opener, follow-up question; see :mod:`training.starter.corpus`).
  A right value in a garbled sentence, or a reply that never stops, is a miss.
* ``mean`` — the mean of ``per_skill``; ``min`` — the weakest skill.
* ``heldout_phrasing`` — the same exact-match on :func:`corpus.heldout_prompts`, i.e. question
  phrasings (and sum operands, memory numbers) never seen in training; ``heldout_per_skill``.
* ``unseen_name_recall`` — exact-match on :func:`corpus.unseen_name_prompts`: the user states a
  name, a pet's name or a town never seen in training ("Hi, my name is Alice.") and asks for it
  two or three turns later.
* ``system_prompt_heldout`` — exact-match on :func:`corpus.system_prompts`: system prompts
  (name, persona, answer style) and the names they give held out from training, questions in
  training phrasings; a reply counts only when it obeys the system prompt. Both come with a
  binomial standard error (``unseen_name_recall_se``, ``system_prompt_heldout_se``).
* ``distinct_style_rate`` — the fraction of prompts for which ``n_samples`` replies sampled at
  temperature 1 (no top-k/top-p) contain at least two distinct answer styles among the
  well-formed ones.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from training.flags import help_field


@dataclass
class EvalConfig:
    """What to evaluate and how much."""

    model: str = help_field("", help="model directory or hub id (required)")
    json: str = help_field("", help="write the figures to this JSON file")
    seed: int = help_field(12345, help="seed of the fresh prompts")
    n_per_skill: int = help_field(50, help="greedy prompts per skill")
    n_heldout: int = help_field(120, help="held-out-phrasing prompts (all skills)")
    n_unseen_names: int = help_field(120, help="recall prompts with names never seen in training")
    n_system: int = help_field(120, help="held-out system-prompt prompts")
    n_style_prompts: int = help_field(60, help="prompts sampled for the style rate")
    n_samples: int = help_field(4, help="samples per prompt at temperature 1")
    max_new_tokens: int = help_field(64, help="reply budget in tokens")
    batch_size: int = help_field(32, help="prompts per generate() call")
    num_threads: int = help_field(0, help="torch CPU threads (0: leave as is)")

    def __post_init__(self):
        for name in ["n_per_skill", "n_heldout", "n_unseen_names", "n_system", "n_style_prompts", "n_samples", "num_threads"]:
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ["max_new_tokens", "batch_size"]:
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
                     sample: bool = False, batch_size: int = 32) -> list[tuple[str, bool]]:
    """Reply to each conversation; returns ``(text, stopped)`` where ``stopped`` says the reply
    ended with an end-of-turn token. Left-padded batches, greedy unless ``sample`` (temperature 1)."""
    from training.chat_format import decode_text, end_of_turn_ids, render_prompt

    eos = end_of_turn_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    out = []
    for s in range(0, len(prompts), batch_size):
        encoded = [render_prompt(tokenizer, m) for m in prompts[s : s + batch_size]]
        width = max(len(e) for e in encoded)
        device = next(model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=1.0 if sample else None, top_k=0 if sample else None, top_p=1.0 if sample else None,
            eos_token_id=eos, pad_token_id=pad,
        )[:, width:]  # (B, new)
        for row in gen.tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            text = decode_text(tokenizer, row[:stop] if stop is not None else row)
            out.append((text.strip(), stop is not None))
    return out


def _exact(item: dict, reply: tuple[str, bool]) -> bool:
    text, stopped = reply
    return stopped and text in item["answers"]


def _per_skill(items: list[dict], replies: list[tuple[str, bool]]) -> dict[str, float]:
    hits = defaultdict(list)
    for item, reply in zip(items, replies, strict=True):
        hits[item["skill"]].append(_exact(item, reply))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def _exact_rate(model, tokenizer, items: list[dict], max_new_tokens: int, batch_size: int) -> tuple[float, list]:
    """Greedy exact-match of ``items`` and the missed ones as ``{"prompt", "reply", "stopped"}``."""
    replies = generate_replies(model, tokenizer, [i["messages"] for i in items], max_new_tokens,
                               batch_size=batch_size)
    missed = [{"prompt": i["messages"][-1]["content"], "reply": r[0], "stopped": r[1]}
              for i, r in zip(items, replies, strict=True) if not _exact(i, r)]
    return 1 - len(missed) / len(items), missed


def evaluate(model, tokenizer, seed: int = 12345, n_per_skill: int = 50, n_heldout: int = 120,
             n_unseen_names: int = 120, n_system: int = 120, n_style_prompts: int = 60, n_samples: int = 4, max_new_tokens: int = 64,
             batch_size: int = 32, progress: bool = True) -> dict:
    """All figures of the module docstring as a dict (plus ``failures``, a few missed replies)."""
    from tqdm.auto import tqdm

    from training.starter import corpus

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    steps = tqdm(total=4, desc="eval", disable=not progress, leave=False)
    items = corpus.eval_prompts(seed, n_per_skill)
    replies = generate_replies(model, tokenizer, [i["messages"] for i in items], max_new_tokens,
                               batch_size=batch_size)
    per_skill = _per_skill(items, replies)
    failures = [{"prompt": i["messages"][-1]["content"], "reply": r[0], "stopped": r[1]}
                for i, r in zip(items, replies, strict=True) if not _exact(i, r)]
    steps.update()
    result = {"per_skill": per_skill, "mean": sum(per_skill.values()) / len(per_skill),
              "min": min(per_skill.values())}
    if n_heldout:
        held = corpus.heldout_prompts(seed, n_heldout)
        held_replies = generate_replies(model, tokenizer, [i["messages"] for i in held], max_new_tokens,
                                        batch_size=batch_size)
        result["heldout_phrasing"] = sum(_exact(i, r) for i, r in zip(held, held_replies, strict=True)) / len(held)
        result["heldout_per_skill"] = _per_skill(held, held_replies)
        failures += [{"prompt": i["messages"][-1]["content"], "reply": r[0], "stopped": r[1], "heldout": True}
                     for i, r in zip(held, held_replies, strict=True) if not _exact(i, r)]
    steps.update()
    for name, n, make in [("unseen_name_recall", n_unseen_names, corpus.unseen_name_prompts),
                          ("system_prompt_heldout", n_system, corpus.system_prompts)]:
        if n:
            result[name], missed = _exact_rate(model, tokenizer, make(seed, n), max_new_tokens, batch_size)
            result[f"{name}_se"] = math.sqrt(result[name] * (1 - result[name]) / n)  # binomial standard error
            failures += [m | {"figure": name} for m in missed]
    steps.update()
    if n_style_prompts and n_samples:
        chosen = corpus.eval_prompts(seed + 1, max(1, n_style_prompts // len(corpus.SKILLS)))
        repeated = [i for i in chosen for _ in range(n_samples)]
        sampled = generate_replies(model, tokenizer, [i["messages"] for i in repeated], max_new_tokens,
                                   sample=True, batch_size=batch_size)
        distinct = 0
        for k, item in enumerate(chosen):
            styles = {item["answers"][t] for t, ok in sampled[k * n_samples : (k + 1) * n_samples]
                      if ok and t in item["answers"]}
            distinct += len(styles) >= 2
        result["distinct_style_rate"] = distinct / len(chosen)
        result["sampled_well_formed"] = sum(_exact(i, r) for i, r in zip(repeated, sampled, strict=True)) / len(repeated)
    steps.update()
    steps.close()
    result["counts"] = {"greedy": len(items), "heldout": n_heldout, "unseen_names": n_unseen_names,
                        "system": n_system,
                        "style_prompts": len(chosen) if n_style_prompts and n_samples else 0,
                        "samples_per_prompt": n_samples}
    result["seconds"] = time.perf_counter() - t0
    result["failures"] = failures[:20]
    return result


def main(argv: list[str] | None = None) -> dict:
    from training.flags import parse_config
    from training.models import load_model_and_tokenizer

    parser = argparse.ArgumentParser(prog="python -m training.starter.eval", description=__doc__.split("\n")[0])
    cfg = parse_config(EvalConfig, argv, parser)
    if not cfg.model:
        parser.error("--model is required (a directory written by `python -m training.starter`)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    model, tok = load_model_and_tokenizer(cfg.model)
    result = evaluate(model, tok, seed=cfg.seed, n_per_skill=cfg.n_per_skill, n_heldout=cfg.n_heldout,
                      n_unseen_names=cfg.n_unseen_names, n_system=cfg.n_system,
                      n_style_prompts=cfg.n_style_prompts, n_samples=cfg.n_samples,
                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2) + "\n")
    skills = " ".join(f"{k}={v:.0%}" for k, v in result["per_skill"].items())
    print(f"eval: exact-match mean {result['mean']:.1%} min {result['min']:.1%} ({skills}); "
          f"held-out phrasing {result.get('heldout_phrasing', float('nan')):.1%}; "
          f"unseen names {result.get('unseen_name_recall', float('nan')):.1%}; "
          f"held-out system prompts {result.get('system_prompt_heldout', float('nan')):.1%}; "
          f"distinct styles {result.get('distinct_style_rate', float('nan')):.1%}; {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
