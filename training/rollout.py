"""Rollouts for PPO: pure sampling from the policy, the reference pass, and per-token forwards.

* :func:`generate_rollouts` — answers to a batch of prompts, sampled with plain temperature-1
  sampling (no top-k, no top-p, no repetition penalty, whatever the model's
  ``generation_config`` says), one ``torch.Generator`` per row so a batch gives the same tokens
  as each prompt alone with the same row seed.
* :func:`reference_model` — the reference policy: the same ``PeftModel`` with its adapters
  disabled, restoring every ``requires_grad`` flag on exit.
* :func:`forward_response` — per-token log-probs (and the last hidden state) of the response
  part of ``query ⧺ response`` sequences.
* :func:`answer_kl` — the KL per answer of sampled rollouts to the reference (the gate's and
  rejection sampling's figure; PPO keeps the per-token terms).

Sampling is written out (prompt pass, then one token a step with the KV cache) rather than
delegated to ``model.generate`` so that no generation-config field (``top_k``,
``repetition_penalty``, ``min_new_tokens``, …) can bend the distribution PPO assumes it samples
from: the PPO ratio and the KL penalty are only right when the rollout tokens are drawn from
``softmax(logits)`` itself.

Not a script; used by :mod:`training.ppo`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from training.chat_format import decode_text, end_of_turn_ids, render_prompt
from training.models import requires_grad_flags, restore_requires_grad, text_config


@dataclass
class Rollouts:
    """A batch of prompts and sampled answers. B = batch, Tq = prompt length, Tr = answer length."""

    query_ids: torch.Tensor  # (B, Tq) long, left-padded prompt tokens
    query_mask: torch.Tensor  # (B, Tq) long, 1 = real prompt token
    response_ids: torch.Tensor  # (B, Tr) long, right-padded with the pad id after the answer
    response_mask: torch.Tensor  # (B, Tr) long, 1 up to and including the first end-of-turn
    ended: torch.Tensor  # (B,) bool, the answer ended with an end-of-turn token
    answers: list[str]  # decoded answers, end-of-turn and special tokens removed

    @property
    def texts(self) -> list[str]:
        """Alias of :attr:`answers`."""
        return self.answers

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, Tq + Tr) prompt ⧺ answer."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, Tq + Tr) 1 on real prompt and answer tokens."""
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) answer length in tokens, end-of-turn included."""
        return self.response_mask.sum(dim=1)


NO_GRAD_LOGITS = 2**24  # logits elements projected at once where no gradient is taken (64 MB of float32)


def no_grad_rows(model, response_len: int) -> int:
    """Rows per forward pass for a no-gradient log-prob measurement of ``response_len``-token
    answers: as many as keep the (rows, Tr + 1, V) logits within ``NO_GRAD_LOGITS`` elements
    (a small vocabulary: the whole batch at once; a 150k one: a few rows)."""
    vocab = int(text_config(model).vocab_size)
    return max(1, NO_GRAD_LOGITS // ((response_len + 1) * vocab))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, so a left-padded row gets the same
    positions as the row alone (pads get 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span] = torch.tensor(list(r), dtype=torch.long)
            mask[i, span] = 1
    return ids, mask


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``(ids (B, T), mask (B, T))``."""
    return _pad(rows, pad_id, left=True)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to ``(ids (B, T), mask (B, T))``."""
    return _pad(rows, pad_id, left=False)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token]: (B, T, V) logits and (B, T) tokens → (B, T) log-probs in nats,
    as ``logits[token] − logsumexp(logits)``: no (B, T, V) log-softmax is kept for the backward
    pass (with a 150k vocabulary, the largest tensor of a PPO minibatch)."""
    logits = logits.float()
    picked = torch.gather(logits, 2, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def _row_generators(seed: int | Sequence[int] | None, n: int) -> list[torch.Generator]:
    if seed is None:
        seeds = [int(torch.randint(0, 2**62, (1,)).item()) for _ in range(n)]
    elif isinstance(seed, int):
        seeds = [seed + i for i in range(n)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} prompts; pass one seed per prompt")
    return [torch.Generator().manual_seed(s) for s in seeds]


@torch.no_grad()
def generate_rollouts(
    policy,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int,
    eos_ids: Sequence[int] | None = None,
    seed: int | Sequence[int] | None = None,
    temperature: float = 1.0,
) -> Rollouts:
    """Sample one answer per prompt with pure sampling.

    Each next token is drawn from ``softmax(logits / temperature)`` over the whole vocabulary:
    no top-k, no top-p, no repetition penalty, no minimum length, regardless of the model's
    ``generation_config``. PPO needs ``temperature=1`` (the default); other values exist for
    evaluation only.

    Args:
        policy: a causal LM (or ``PeftModel``); used in whatever adapter state it is in.
        prompts: B conversations, each a list of ``{"role", "content"}`` dicts ending with the
            user turn to answer; rendered with the chat template and a generation prompt.
        max_new_tokens: the answer length limit, in tokens.
        eos_ids: token ids that end the turn; the answer stops at the first one (kept in
            ``response_ids`` and in the mask). Default: ``end_of_turn_ids(policy, tokenizer)``.
        seed: an int (row i uses ``seed + i``), one seed per prompt, or None (random). With the
            same row seed a prompt gets the same tokens alone as in any batch.

    Returns:
        :class:`Rollouts` with the batch left-padded and answers right-padded.

    Raises:
        ValueError: no prompts, ``max_new_tokens < 1``, no ``eos_ids``, or the tokenizer has
            neither a pad nor an eos token.
    """
    if not prompts:
        raise ValueError("generate_rollouts needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_ids is None:
        eos_ids = end_of_turn_ids(policy, tokenizer)
    if not eos_ids:
        raise ValueError("eos_ids is empty; pass training.chat_format.end_of_turn_ids(model, tokenizer)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad and no eos token; set tokenizer.pad_token")
    device = next(policy.parameters()).device
    gens = _row_generators(seed, len(prompts))
    query_ids, query_mask = left_pad([render_prompt(tokenizer, p) for p in prompts], pad_id)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    B = query_ids.shape[0]
    eos = torch.tensor(list(eos_ids), device=device)

    mask = query_mask  # (B, T) grows by one column a step
    positions = position_ids_from_mask(mask)  # (B, Tq)
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(policy) else {}  # the next token's only
    out = policy(input_ids=query_ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    cache_key = "cache" if "cache" in out.keys() else "past_key_values"  # transformers 5 renamed it
    past = out[cache_key]
    next_pos = positions[:, -1:] + 1  # (B, 1)
    tokens: list[torch.Tensor] = []  # each (B,)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1, :].float() / temperature  # (B, V)
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        cdf = probs.cumsum(dim=-1).cpu()  # (B, V)
        u = torch.stack([torch.rand(1, generator=g) for g in gens]).to(cdf.dtype)  # (B, 1)
        u = u * cdf[:, -1:]  # guards against a cdf ending just below 1
        tok = torch.searchsorted(cdf, u).squeeze(1).clamp(max=probs.shape[-1] - 1).to(device)  # (B,)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, eos)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        out = policy(
            input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
            use_cache=True, **{cache_key: past},
        )
        past = out[cache_key]
        next_pos = next_pos + 1

    response_ids = torch.stack(tokens, dim=1)  # (B, Tr)
    is_eos = torch.isin(response_ids, eos)  # (B, Tr)
    # 1 up to and including the first end-of-turn token: no end-of-turn strictly before t.
    before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    response_mask = (~before).long()
    ended = is_eos.any(dim=1)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    answers = []
    for row, m in zip(response_ids.tolist(), response_mask.tolist(), strict=True):
        kept = [t for t, keep in zip(row, m, strict=True) if keep and t not in eos_ids]
        answers.append(decode_text(tokenizer, kept))
    return Rollouts(query_ids, query_mask, response_ids, response_mask, ended, answers)


def forward_response(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
    output_hidden: bool = False, max_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the last ``response_len`` tokens of ``input_ids``.

    Args:
        input_ids: (B, T) prompt ⧺ answer, prompt left-padded, answer right-padded.
        attention_mask: (B, T) 1 on real tokens.
        response_len: Tr, the answer width.
        output_hidden: also return the last hidden state at the positions that predict the
            answer tokens (what a value head reads).
        max_rows: run the batch through the model this many rows at a time (the same
            figures; a (B, Tr, V) logits tensor of a whole rollout batch never exists at once).

    Returns:
        ``(logprobs (B, Tr) nats, hidden (B, Tr, H) or None)``; logprobs[:, t] is
        log π(answer token t | prompt, answer tokens < t).
    """
    if max_rows is not None and input_ids.shape[0] > max_rows:
        parts = [forward_response(model, input_ids[s:s + max_rows], attention_mask[s:s + max_rows], response_len,
                                  output_hidden) for s in range(0, input_ids.shape[0], max_rows)]
        hidden = torch.cat([h for _, h in parts]) if output_hidden else None
        return torch.cat([lp for lp, _ in parts]), hidden
    # only the Tr + 1 last positions go through the LM head where the model allows it: the
    # prompt's (B, Tq, V) logits would be thrown away (for a 150k vocabulary, most of the memory)
    keep = {"logits_to_keep": response_len + 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=output_hidden, use_cache=False, **keep,
    )
    T = input_ids.shape[1]
    logits = out.logits[:, -response_len - 1: -1, :].float()  # (B, Tr, V): positions T-Tr-1 … T-2
    logprobs = logprobs_from_logits(logits, input_ids[:, T - response_len:])  # (B, Tr)
    hidden = out.hidden_states[-1][:, T - response_len - 1: T - 1, :] if output_hidden else None
    return logprobs, hidden


def _accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes ``logits_to_keep`` (transformers' own model classes
    do; a remote-code model may not, and then gets a plain forward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base))


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    # once per class: this is asked before every forward of a rollout and a PPO minibatch
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@contextlib.contextmanager
def reference_model(policy) -> Iterator[object]:
    """The reference policy: ``policy`` with every LoRA adapter disabled.

    peft's ``disable_adapter()`` re-enables the active adapter on exit by calling
    ``set_adapter``, which marks its weights trainable even when they were loaded frozen. This
    context snapshots every ``requires_grad`` flag and restores them on exit, so entering and
    leaving the reference pass changes nothing but the forward it runs.

    Raises:
        TypeError: ``policy`` is not a peft model (no ``disable_adapter``); the reference would
            otherwise silently be the policy itself.
    """
    if not hasattr(policy, "disable_adapter"):
        raise TypeError(
            "the policy must be a peft PeftModel (base + LoRA adapter) so that the reference is "
            "the base with the adapter disabled; wrap it with training.models.add_lora"
        )
    flags = requires_grad_flags(policy)
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        restore_requires_grad(policy, flags)


@torch.no_grad()
def answer_kl(policy, rollouts: Rollouts) -> torch.Tensor:
    """(B,) KL(π ‖ π_ref) per answer of sampled ``rollouts``, nats: the k1 estimate
    log π(a) − log π_ref(a) summed over answer tokens, π being ``policy`` as it is (its active
    adapter) and π_ref the same model with its adapters disabled (Ziegler et al. 2019)."""
    Tr = rollouts.response_ids.shape[1]
    ids, mask = rollouts.input_ids, rollouts.attention_mask
    rows = no_grad_rows(policy, Tr)
    logprobs, _ = forward_response(policy, ids, mask, Tr, max_rows=rows)  # (B, Tr)
    with reference_model(policy):
        ref_logprobs, _ = forward_response(policy, ids, mask, Tr, max_rows=rows)
    return ((logprobs - ref_logprobs) * rollouts.response_mask).sum(dim=1)
