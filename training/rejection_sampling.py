"""Rejection-sampling fine-tuning (best-of-n distillation) of the policy adapter, run before PPO.

Llama 2 (Touvron et al. 2023, §3.2.3) trained its chat models with rejection sampling before PPO:
sample ``n`` answers per prompt from the current policy, keep the one the reward model scores
highest, and fine-tune on those as if they were demonstrations (also RAFT, Dong et al. 2023).
The fine-tuned policy moves towards the best-of-n policy, whose KL to the sampling policy is at
most ``log n − (n − 1)/n`` nats (Stiennon et al. 2020, App. G.3; 1.20 nats for n = 8), and it
learns only from text the policy itself wrote, so it keeps its skills better than a policy
gradient step that buys the same reward.

Steps of :func:`rejection_sampling_finetune`:

    1 sample   n answers per prompt, pure temperature-1 sampling      n × P answers
    2 score    reward_fn(prompts, answers)                            (n, P) raw scores
    3 select   per prompt, the best-scoring answer that ended (end-of-turn token)
    4 tune     token NLL of the selected answers (prompt tokens masked), AdamW on the active
               adapter's LoRA weights, ``steps`` minibatches
    5 measure  the tuned policy's KL to the reference on fresh samples    nats per answer

It is off by default (``n`` = 1): in the online benchmark no setting beat PPO alone for both
simulated annotators (docs/benchmarks.md).

Not a script; a round (:mod:`training.round`) runs it in each round when ``--rs.n`` > 1 (``--rs.steps``, …).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from training.chat_format import end_of_turn_ids
from training.flags import help_field
from training.models import (
    active_lora_params,
    eval_with_checkpointing,
    requires_grad_flags,
    restore_requires_grad,
)
from training.rollout import answer_kl, generate_rollouts
from training.seeds import derive_seed
from training.sft import IGNORE, DemonstrationBatches

log = logging.getLogger(__name__)

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]


@dataclass
class RejectionConfig:
    """Rejection-sampling fine-tuning settings (flags ``--rs.*`` of ``python -m training.jobs``)."""

    n: int = help_field(
        1, help="answers sampled per prompt; the reward model's best is kept (1 = off, the default; Llama 2 used "
        "rejection sampling before PPO)")
    steps: int = help_field(100, help="fine-tuning minibatches on the kept answers")
    batch_size: int = help_field(16, help="kept answers per fine-tuning step")
    lr: float = help_field(5e-4, help="AdamW learning rate for the policy adapter's LoRA weights")
    max_grad_norm: float = help_field(1.0, help="gradient clipping (global L2 norm)")
    max_new_tokens: int = help_field(48, help="answer length limit, tokens")
    rollout_batch_size: int = help_field(64, help="prompts sampled at once")
    only_ended: bool = help_field(
        True, help="keep only answers that ended with an end-of-turn token (a prompt whose n answers "
        "all hit the length limit is left out), so the policy is not taught to ramble")
    kl_prompts: int = help_field(
        64, help="answers sampled after fine-tuning to measure the policy's KL to the reference "
        "(rs/kl, nats per answer); a round raises PPO's KL target by it")
    seed: int = help_field(0, help="sampling seeds and minibatch order")

    def __post_init__(self):
        for name in ("n", "steps", "batch_size", "lr", "max_grad_norm", "max_new_tokens", "rollout_batch_size",
                     "kl_prompts"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"RejectionConfig.{name} (--rs.{name.replace('_', '-')}) must be a finite "
                                 f"number > 0, got {value!r}")

    @property
    def enabled(self) -> bool:
        """True when more than one answer per prompt is sampled (best of one is no selection)."""
        return self.n > 1


@dataclass
class BestOfN:
    """What step 1–3 produced. P = prompts, n = answers per prompt."""

    answers: list[list[str]]  # (n, P) sampled answers
    scores: torch.Tensor  # (n, P) raw reward-model scores
    ended: torch.Tensor  # (n, P) bool, the answer ended with an end-of-turn token
    chosen: list[int | None]  # (P,) index into answers of the kept answer; None: prompt left out
    examples: list[tuple[list[int], list[int]]]  # kept (prompt ⧺ answer ids, labels on the answer)


@torch.no_grad()
def best_of_n(policy, tokenizer, reward_fn: RewardFn, prompts: list[list[dict]], config: RejectionConfig,
              eos_ids: list[int] | None = None) -> BestOfN:
    """Steps 1–3: sample ``config.n`` answers per prompt from ``policy`` as it is (pure
    sampling), score them, and keep each prompt's best as a training example whose tokens are
    exactly the sampled ones (prompt tokens labelled ``-100``; the answer and its end-of-turn
    token labelled).

    Raises:
        ValueError: no prompts, or ``reward_fn`` returns the wrong number of scores.
    """
    if not prompts:
        raise ValueError("best_of_n needs at least one prompt")
    eos_ids = eos_ids or end_of_turn_ids(policy, tokenizer)
    P, n = len(prompts), config.n
    answers: list[list[str]] = [[] for _ in range(n)]
    tokens: list[list[tuple[list[int], list[int]]]] = [[] for _ in range(n)]
    scores = torch.empty(n, P)
    ended = torch.zeros(n, P, dtype=torch.bool)
    for k in range(n):
        for start in range(0, P, config.rollout_batch_size):
            chunk = prompts[start:start + config.rollout_batch_size]
            ro = generate_rollouts(policy, tokenizer, chunk, config.max_new_tokens, eos_ids,
                                   seed=derive_seed(config.seed, "rs/sample", k, start))
            for q_ids, q_mask, r_ids, r_mask in zip(ro.query_ids, ro.query_mask, ro.response_ids,
                                                    ro.response_mask, strict=True):
                tokens[k].append((q_ids[q_mask.bool()].tolist(), r_ids[r_mask.bool()].tolist()))
            raw = torch.as_tensor(reward_fn(chunk, ro.answers), dtype=torch.float32).flatten()
            if raw.shape[0] != len(chunk):
                raise ValueError(f"reward_fn returned {raw.shape[0]} scores for {len(chunk)} answers")
            scores[k, start:start + len(chunk)] = raw
            ended[k, start:start + len(chunk)] = ro.ended.cpu()
            answers[k] += ro.answers
    eligible = ended if config.only_ended else torch.ones_like(ended)
    masked = scores.masked_fill(~eligible, float("-inf"))  # (n, P)
    chosen: list[int | None] = []
    examples = []
    for p in range(P):
        if not bool(eligible[:, p].any()):
            chosen.append(None)
            continue
        k = int(masked[:, p].argmax())
        chosen.append(k)
        query, answer = tokens[k][p]
        if answer:
            examples.append((query + answer, [IGNORE] * len(query) + answer))
    return BestOfN(answers, scores, ended, chosen, examples)


@torch.no_grad()
def measure_kl(policy, tokenizer, prompts: list[list[dict]], config: RejectionConfig,
               eos_ids: list[int] | None = None) -> float:
    """Mean KL(π ‖ π_ref) per answer (nats, k1 summed over answer tokens) of ``policy`` (its
    active adapter) to the reference (adapter disabled), on one pure-sampling answer to each of
    ``config.kl_prompts`` prompts (cycled): the quantity PPO penalises and logs (Ziegler et al. 2019).

    Raises:
        ValueError: no prompts.
    """
    if not prompts:
        raise ValueError("measure_kl needs at least one prompt")
    eos_ids = eos_ids or end_of_turn_ids(policy, tokenizer)
    batch = [prompts[i % len(prompts)] for i in range(config.kl_prompts)]
    total = 0.0
    for start in range(0, len(batch), config.rollout_batch_size):
        chunk = batch[start:start + config.rollout_batch_size]
        ro = generate_rollouts(policy, tokenizer, chunk, config.max_new_tokens, eos_ids,
                               seed=derive_seed(config.seed, "rs/kl", start))
        total += float(answer_kl(policy, ro).sum())  # (b,) nats per answer, summed
    return total / len(batch)


def rejection_sampling_finetune(policy, tokenizer, reward_fn: RewardFn, prompts: list[list[dict]],
                                config: RejectionConfig) -> dict:
    """Fine-tune the active LoRA adapter of ``policy`` on its own best-of-n answers (steps 1–4).

    Args:
        policy: a peft ``PeftModel``; only its active adapter's LoRA weights change, and every
            ``requires_grad`` flag and the train/eval mode are restored at the end.
        reward_fn: ``(prompts, answers) -> (B,)`` raw scores (:func:`training.reward_training.make_reward_fn`).
        prompts: conversations ending with a user turn.

    Returns:
        Metrics (floats): ``rs/score_mean`` (all samples), ``rs/score_best`` (the kept ones),
        ``rs/examples`` (kept answers), ``rs/ended_rate``, ``rs/nll_first`` and ``rs/nll_last``
        (nats per token, first and last minibatch), ``rs/length_tokens`` (kept answers),
        ``rs/kl`` (:func:`measure_kl` after fine-tuning, nats per answer) and ``time/rs_s`` (seconds). When no answer ended: ``rs/examples`` 0, no fine-tuning and no
        fine-tuning figures.

    Raises:
        ValueError: no prompts, or the policy has no LoRA adapter.
    """
    t0 = time.time()
    trainable = active_lora_params(policy)
    flags = requires_grad_flags(policy)
    was_training = policy.training
    device = next(policy.parameters()).device
    eval_with_checkpointing(policy)  # no dropout while sampling or tuning: the same function PPO will see
    try:
        picked = best_of_n(policy, tokenizer, reward_fn, prompts, config)
        metrics = {
            "rs/score_mean": float(picked.scores.mean()),
            "rs/ended_rate": float(picked.ended.float().mean()),
            "rs/examples": float(len(picked.examples)),
        }
        if not picked.examples:
            log.warning("rejection sampling: no sampled answer ended; nothing to fine-tune on")
            return {**metrics, "time/rs_s": time.time() - t0}
        kept = [picked.scores[k, p] for p, k in enumerate(picked.chosen) if k is not None]
        metrics["rs/score_best"] = float(torch.stack(kept).mean())
        metrics["rs/length_tokens"] = sum(sum(1 for t in lab if t != IGNORE) for _, lab in picked.examples) / len(
            picked.examples)
        for _, p in trainable:
            p.requires_grad_(True)
        params = [p for _, p in trainable]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        batches = DemonstrationBatches(picked.examples, config.batch_size, tokenizer.pad_token_id,
                                       derive_seed(config.seed, "rs/batches"), device)
        nll = []
        for _step in range(config.steps):
            loss = batches.loss(policy)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            nll.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        metrics["rs/kl"] = measure_kl(policy, tokenizer, prompts, config)
        metrics.update({"rs/nll_first": nll[0], "rs/nll_last": nll[-1], "time/rs_s": time.time() - t0})
    finally:
        restore_requires_grad(policy, flags)
        policy.train(was_training)
    log.info("rejection sampling done: %s", ", ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
    return metrics
