"""KL-regularised PPO on the policy's LoRA adapter, one explicit loop.

Each of ``config.steps`` iterations runs the numbered steps of the classic RLHF recipe
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022,
InstructGPT; the structure of TRL's old ``PPOTrainer``):

    1 rollout   sample answers with pure temperature-1 sampling        (B, Tr) tokens
    2 score     reward_fn(prompts, answers), normalised and clipped     (B,)
    3 KL        per-token k1 = log π(a) − log π_ref(a)                  (B, Tr) nats
    4 rewards   −β·KL per token, + score (− no-eos penalty) at the last answer token
    5 GAE       advantages and returns (Schulman et al. 2016)           (B, Tr)
    6 whiten    advantages to mean 0, std 1 over answer tokens
    7 epochs    minibatches, clipped policy + value losses, grad clipping, AdamW
    8 log       namespaced metrics; the adaptive KL controller updates β

The reference is the same ``PeftModel`` with its adapter disabled
(:func:`training.rollout.reference_model`). The optimizer holds only the active adapter's
LoRA weights and the value head; base weights never change.

Pure, hand-checkable pieces are in :mod:`training.ppo_math` (:func:`per_token_kl`,
:func:`compute_gae`, :func:`whiten`, :func:`clipped_policy_loss`, :func:`clipped_value_loss`,
:class:`AdaptiveKLController`); :func:`logprobs_from_logits` is in :mod:`training.rollout`. A
round (:mod:`training.round`) calls :func:`ppo_train`. From the command line::

    python -m training.ppo --model DIR_OR_HUB_ID --rm rm/ --prompts prompts.jsonl --out adapter/ \
        [--adapter previous_adapter/] [--steps 8 --lr 1e-4 ...]

(``prompts.jsonl``: one ``{"messages": [...]}`` a line, each ending with a user turn.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from training import distributed
from training.chat_format import end_of_turn_ids
from training.flags import add_dataclass_args, dataclass_from_args, help_field
from training.models import (
    active_lora_params,
    eval_with_checkpointing,
    requires_grad_flags,
    restore_requires_grad,
    text_config,
)
from training.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    leave_one_out_baseline,
    minibatch_rows,
    per_token_kl,
    prompt_batches,
    whiten,
)
from training.reward_training import RewardNormalizer
from training.rollout import (
    forward_response,
    generate_rollouts,
    no_grad_rows,
    reference_model,
)
from training.seeds import derive_seed
from training.sft import DemonstrationBatches

log = logging.getLogger(__name__)

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]


@dataclass
class PPOConfig:
    """PPO hyper-parameters. The defaults are tuned on the starter model with ``python -m
    bench.online_loop`` and ``bench.ppo_replay`` (figures in docs/benchmarks.md): many fresh
    answers a round (``steps`` × ``rollout_batch_size``), several answers per prompt with a
    leave-one-out baseline, and β adapting within a round so the KL to the reference stays a
    few nats."""

    init_kl_coef: float = help_field(0.2, help="β, the per-token KL penalty coefficient at the start")
    adaptive_kl: bool = help_field(True, help="adjust β towards kl_target (Ziegler et al. 2019, §2.2)")
    kl_target: float = help_field(1.5, help="target KL per answer, nats (sum over answer tokens), mean over a round: KL grows within a round, so its end lands at about twice this")
    kl_horizon: int = help_field(100, help="controller horizon, in samples")
    gamma: float = help_field(1.0, help="discount over answer tokens")
    lam: float = help_field(0.95, help="GAE λ")
    cliprange: float = help_field(0.2, help="ε of the clipped policy objective")
    cliprange_value: float = help_field(0.2, help="ε of the clipped value loss")
    vf_coef: float = help_field(0.1, help="weight of the value loss")
    ppo_epochs: int = help_field(2, help="passes over each rollout batch (fresh answers helped more than more passes over the same ones)")
    mini_batch_size: int = help_field(16, help="answers per gradient step")
    micro_batch_size: int = help_field(
        0, help="answers per forward/backward pass within a minibatch, gradients accumulated to the same step "
        "(0: the whole minibatch at once); smaller holds less memory, the step is the same")
    rollout_batch_size: int = help_field(64, help="answers sampled per iteration")
    samples_per_prompt: int = help_field(
        4, help="answers sampled per prompt in a rollout batch (a divisor of rollout_batch_size); with "
        "more than 1, each score is centred on the mean score of the other answers to the same prompt "
        "(a leave-one-out baseline: how hard a prompt is does not pass for how good an answer is)")
    steps: int = help_field(96, help="iterations (rollout batches) per round: steps × rollout_batch_size answers")
    lr: float = help_field(5e-4, help="AdamW learning rate for the LoRA weights and the value head")
    max_grad_norm: float = help_field(1.0, help="gradient clipping (global L2 norm)")
    ptx_coef: float = help_field(
        0.0, help="γ of PPO-ptx (Ouyang et al. 2022, §3.5): each minibatch loss adds γ × the mean "
        "token NLL of demonstration conversations (assistant tokens), which keeps the policy's "
        "skills from eroding; needs ptx examples (0 = off: it also holds back a policy learning a new "
        "style; docs/benchmarks.md)")
    max_new_tokens: int = help_field(48, help="answer length limit, tokens")
    no_eos_penalty: float = help_field(1.0, help="subtracted from the (normalised) score of answers cut at the limit")
    normalize_reward: bool = help_field(True, help="normalise scores by the reference policy's answers (mean 0, std 1)")
    normalize_samples: int = help_field(32, help="reference answers sampled to fit the normalisation")
    score_clip: float = help_field(5.0, help="clip normalised scores to ±score_clip (0 = no clip)")
    whiten_advantages: bool = help_field(True, help="advantages to mean 0 std 1 per batch")
    seed: int = help_field(0, help="prompt order and sampling seeds")

    def __post_init__(self):
        positive = ("init_kl_coef", "kl_target", "kl_horizon", "cliprange", "cliprange_value",
                    "ppo_epochs", "mini_batch_size", "rollout_batch_size", "samples_per_prompt", "steps", "lr",
                    "max_grad_norm", "max_new_tokens", "normalize_samples")
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"PPOConfig.{name} (--ppo.{name.replace('_', '-')}) must be a finite "
                                 f"number > 0, got {value!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("vf_coef", "no_eos_penalty", "score_clip", "ptx_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ValueError(
                f"PPOConfig.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"samples_per_prompt ({self.samples_per_prompt})"
            )
        if not 0 <= self.micro_batch_size <= self.mini_batch_size:
            raise ValueError(
                f"PPOConfig.micro_batch_size ({self.micro_batch_size}) must be in 0..mini_batch_size "
                f"({self.mini_batch_size}); 0 is the whole minibatch"
            )
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(
                f"PPOConfig.mini_batch_size ({self.mini_batch_size}) must be <= "
                f"rollout_batch_size ({self.rollout_batch_size})"
            )


VALUE_HEAD_FILE = "value_head.safetensors"  # beside the adapter it was trained with


class ValueHead(torch.nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden state h_t; (B, T, H) → (B, T).
    Zero-initialised, so the first values are 0. Saved beside the policy's adapter
    (:meth:`save`), so the next round's PPO continues with the values the policy was trained
    with instead of learning them again from zero while the policy moves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)

    def save(self, directory) -> None:
        """Write ``directory/value_head.safetensors`` (float32)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.summary.state_dict().items()}
        save_file(tensors, str(Path(directory) / VALUE_HEAD_FILE))

    @classmethod
    def load(cls, directory, hidden_size: int) -> ValueHead | None:
        """The value head saved in ``directory``, or None when there is none or it was trained
        on another hidden size (a fresh one is then the only honest start)."""
        from safetensors.torch import load_file

        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            return None
        state = load_file(str(path))
        if tuple(state.get("weight", torch.zeros(0)).shape) != (1, hidden_size):
            return None
        head = cls(hidden_size)
        head.summary.load_state_dict(state)
        return head


# ---------------------------------------------------------------- the loop


def _hidden_size(policy) -> int:
    return int(text_config(policy).hidden_size)


def fit_reference_normalizer(
    policy, tokenizer, reward_fn: RewardFn, prompts: list[list[dict]], config: PPOConfig,
    eos_ids: list[int] | None = None,
) -> RewardNormalizer:
    """Score ``config.normalize_samples`` answers of the reference policy (adapter disabled)
    and fit a :class:`~training.reward_training.RewardNormalizer` on them (InstructGPT; Ziegler et al.)."""
    eos_ids = eos_ids or end_of_turn_ids(policy, tokenizer)
    (idx,) = prompt_batches(len(prompts), config.normalize_samples, 1, derive_seed(config.seed, "ppo/normalizer-prompts"))
    batch = [prompts[i] for i in idx]
    starts = distributed.shard(range(0, len(batch), config.rollout_batch_size))  # a round's ranks share them
    prompts_done, answers = [], []
    with reference_model(policy):
        for start in starts:
            chunk = batch[start:start + config.rollout_batch_size]
            ro = generate_rollouts(policy, tokenizer, chunk, config.max_new_tokens, eos_ids,
                                   seed=derive_seed(config.seed, "ppo/normalizer", start))
            prompts_done += chunk
            answers += ro.answers
    scores = torch.as_tensor(reward_fn(prompts_done, answers), dtype=torch.float32).flatten() if answers \
        else torch.zeros(0)
    scores = torch.tensor(distributed.gather(scores.tolist()), dtype=torch.float32)  # every rank's, in order
    return RewardNormalizer.fit(scores, clip=config.score_clip)


def _minibatch_backward(policy, value_head, config: PPOConfig, mb: torch.Tensor, ids, attn, Tr: int, mask,
                        old_logprobs, old_values, advantages, returns) -> dict[str, float]:
    """Backward of one minibatch's clipped policy + value loss (step 7 of :func:`ppo_train`),
    ``config.micro_batch_size`` rows per pass: each pass's token means are weighted by its
    share of the minibatch's answer tokens, so the accumulated gradient is the whole
    minibatch's. Returns the minibatch's losses and clip fractions, token-weighted alike.

    In a data-parallel round the minibatch is split over the ranks (``mb``: this rank's part,
    maybe empty): the weights are shares of *all* ranks' answer tokens, so the gradients and the
    figures summed over ranks (:func:`training.distributed.sum_gradients`) are the whole
    minibatch's; the figures returned are already summed.

    ``mb``: (b,) row indices; ``ids``/``attn`` (B, T); ``mask``, ``old_*``, ``advantages``,
    ``returns``: (B, Tr)."""
    micro = config.micro_batch_size or max(len(mb), 1)
    tokens = distributed.sum_floats([float(mask[mb].sum())])[0]
    keys = ("ppo/loss/policy", "ppo/loss/value", "ppo/clipfrac", "ppo/approx_kl", "ppo/val/clipfrac")
    out = dict.fromkeys(keys, 0.0)
    for part in (mb.split(micro) if tokens > 0 else ()):
        weight = float(mask[part].sum()) / tokens
        if weight == 0.0:
            continue
        logprobs, hid = forward_response(policy, ids[part], attn[part], Tr, output_hidden=True)
        values = value_head(hid)  # (u, Tr)
        pg_loss, clipfrac, approx_kl = clipped_policy_loss(
            logprobs, old_logprobs[part], advantages[part], mask[part], config.cliprange)
        vf_loss, vf_clipfrac = clipped_value_loss(
            values, old_values[part], returns[part], mask[part], config.cliprange_value)
        ((pg_loss + config.vf_coef * vf_loss) * weight).backward()
        for key, value in (("ppo/loss/policy", pg_loss), ("ppo/loss/value", vf_loss), ("ppo/clipfrac", clipfrac),
                           ("ppo/approx_kl", approx_kl), ("ppo/val/clipfrac", vf_clipfrac)):
            out[key] += weight * float(value.detach())
    return dict(zip(keys, distributed.sum_floats([out[k] for k in keys]), strict=True))


def ppo_train(
    policy, tokenizer, reward_fn: RewardFn, prompts: list[list[dict]], config: PPOConfig,
    value_head: ValueHead | None = None, progress: bool = False,
    normalizer: RewardNormalizer | None = None,
    ptx_examples: list[tuple[list[int], list[int]]] | None = None,
    on_iteration: Callable[[int, int], bool] | None = None,
) -> dict:
    """Run ``config.steps`` PPO iterations on the active LoRA adapter of ``policy``.

    Args:
        policy: a peft ``PeftModel`` (base + LoRA adapter). Trained in place: only its active
            adapter's LoRA weights change; every ``requires_grad`` flag is restored at the end.
        reward_fn: ``(prompts (B lists of messages), answers (B str)) -> (B,)`` scores, e.g.
            :func:`training.reward_training.make_reward_fn`. Higher is better; any scale.
        prompts: conversations ending with a user turn; batches cycle through them.
        value_head: trained in place if given (keep it across rounds); a fresh zero-initialised
            one otherwise.
        normalizer: score normalisation to use; if None and ``config.normalize_reward``, one is
            fitted on the reference policy's answers first.
        ptx_examples: demonstrations as ``(ids, labels)`` token lists (labels ``-100`` where no
            loss, e.g. :func:`training.sft.encode_conversation`); with
            ``config.ptx_coef`` > 0 every minibatch step adds γ × their mean token NLL under the
            policy (PPO-ptx), cycling through them ``mini_batch_size`` at a time.
        on_iteration: called as ``on_iteration(0, total)`` before the first iteration and
            ``on_iteration(done, total)`` after each (progress, e.g.
            :meth:`training.progress.RoundProgress.ppo_iteration`); True returned after an
            iteration ends PPO there, at an iteration boundary (a time budget; at least one
            iteration always runs).

    Returns:
        Metrics (floats), averaged over iterations: ``objective/kl`` (nats per answer, the
        penalised k1 KL), ``objective/reward`` (raw score), ``objective/score`` (normalised,
        clipped, with the no-eos penalty), ``objective/rlhf_reward`` (score − β·KL),
        ``objective/kl_coef`` (β at the end), ``objective/entropy``, ``ppo/clipfrac``,
        ``ppo/approx_kl``, ``ppo/loss/policy``, ``ppo/loss/value``, ``ppo/val/clipfrac``,
        ``ppo/grad_norm``, ``answer/length_tokens``, ``answer/no_eos_rate``, and
        ``objective/reward_first`` / ``objective/reward_last`` (first and last iteration),
        ``objective/kl_last`` (the last iteration's KL), ``ppo/loss/ptx`` (with PPO-ptx),
        ``ppo/iterations`` (run) and ``ppo/stopped_early`` (1.0 when ``on_iteration`` ended it).

    Raises:
        ValueError: no prompts, or the policy has no LoRA adapter.
        TypeError: the policy is not a peft model.
    """
    if not prompts:
        raise ValueError("ppo_train needs at least one prompt")
    t0 = time.time()
    trainable = active_lora_params(policy)
    flags = requires_grad_flags(policy)
    device = next(policy.parameters()).device
    eos_ids = end_of_turn_ids(policy, tokenizer)
    if value_head is None:
        value_head = ValueHead(_hidden_size(policy))
    value_head.to(device)
    kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
              if config.adaptive_kl else FixedKLController(config.init_kl_coef))
    was_training = policy.training
    eval_with_checkpointing(policy)  # no dropout: log-probs must be deterministic for the PPO ratio
    if normalizer is None and config.normalize_reward:
        normalizer = fit_reference_normalizer(policy, tokenizer, reward_fn, prompts, config, eos_ids)
    for _, p in trainable:
        p.requires_grad_(True)
    params = [p for _, p in trainable] + list(value_head.parameters())
    distributed.broadcast_tensors(params)  # a data-parallel round's ranks start from rank 0's weights
    optimizer = torch.optim.AdamW(params, lr=config.lr, eps=1e-5, weight_decay=0.0)
    history: list[dict] = []
    ptx = DemonstrationBatches(ptx_examples, config.mini_batch_size, tokenizer.pad_token_id,
                               derive_seed(config.seed, "ppo/ptx"), device) \
        if ptx_examples and config.ptx_coef > 0 else None
    k = config.samples_per_prompt
    batches = [[i for i in idx for _ in range(k)]  # each prompt k times, adjacent
               for idx in prompt_batches(len(prompts), config.rollout_batch_size // k, config.steps,
                                          derive_seed(config.seed, "ppo/prompts"))]
    # a data-parallel round's ranks share each batch's prompts (all k answers to one prompt on
    # one rank: the leave-one-out baseline needs them together); rows keep their batch-wide
    # seeds, so a rank samples what one process would have sampled for those rows
    n_groups, world = config.rollout_batch_size // k, distributed.world_size()
    if n_groups < world:
        raise ValueError(f"{n_groups} prompts per PPO iteration cannot be shared by {world} processes: "
                         f"raise --ppo.rollout-batch-size to at least {world * k}")
    my_rows = [r for g in distributed.shard(range(n_groups)) for r in range(g * k, (g + 1) * k)]  # contiguous
    first_row, rows_total = my_rows[0], n_groups * k
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="PPO", unit="batch")
    if on_iteration is not None:
        on_iteration(0, len(batches))  # the iterations start now (the normaliser is fitted)
    try:
        for step, idx in enumerate(iterator):
            batch = [prompts[idx[r]] for r in my_rows]
            B = len(batch)
            # 1 rollout: pure sampling from the current policy.
            first_seed = derive_seed(config.seed, "ppo/rollout", step)
            ro = generate_rollouts(policy, tokenizer, batch, config.max_new_tokens, eos_ids,
                                   seed=[first_seed + r for r in my_rows])
            ids, attn = ro.input_ids, ro.attention_mask  # (B, Tq + Tr)
            mask = ro.response_mask.float()  # (B, Tr)
            Tr = mask.shape[1]
            # 2 score: raw → normalised, clipped; minus the penalty when cut at the length limit.
            raw = torch.as_tensor(reward_fn(batch, ro.answers), dtype=torch.float32).flatten()
            if raw.shape[0] != B:
                raise ValueError(f"reward_fn returned {raw.shape[0]} scores for {B} answers")
            score = normalizer(raw) if normalizer is not None else raw  # (B,)
            score = score - config.no_eos_penalty * (~ro.ended).float().cpu()
            score = score.to(device)
            # the reward's score: centred per prompt on the other answers to it when k > 1, so
            # how hard a prompt is does not pass for how good an answer is
            centred = leave_one_out_baseline(score, k) if k > 1 else score  # (B,)
            with torch.no_grad():
                # 3 per-token KL to the reference (adapter disabled).
                rows = no_grad_rows(policy, Tr)  # never the whole batch's (B, Tr, V) logits at once
                old_logprobs, hidden = forward_response(policy, ids, attn, Tr, output_hidden=True, max_rows=rows)
                old_values = value_head(hidden) * mask  # (B, Tr)
                with reference_model(policy):
                    ref_logprobs, _ = forward_response(policy, ids, attn, Tr, max_rows=rows)  # (B, Tr)
                kl = per_token_kl(old_logprobs, ref_logprobs) * mask  # (B, Tr) nats
                # 4 rewards: −β·KL on every answer token, + score on the last one.
                beta = kl_ctl.value
                rewards = -beta * kl  # (B, Tr)
                last = (mask.sum(dim=1) - 1).long()  # (B,) index of the last answer token
                rewards[torch.arange(B, device=device), last] += centred
                # 5 GAE.
                advantages, returns = compute_gae(rewards, old_values, mask, config.gamma, config.lam)
                # 6 whiten advantages over answer tokens.
                if config.whiten_advantages:  # over every rank's answer tokens
                    advantages = whiten(advantages, mask, total=distributed.sum_floats if world > 1 else None)
            # 7 minibatch epochs: clipped policy + value losses, gradient clipping.
            stats: dict[str, list[float]] = {k: [] for k in (
                "ppo/loss/policy", "ppo/loss/value", "ppo/clipfrac", "ppo/approx_kl",
                "ppo/val/clipfrac", "ppo/grad_norm")}
            gen = torch.Generator().manual_seed(derive_seed(config.seed, "ppo/minibatch", step))
            for _epoch in range(config.ppo_epochs):
                for mb in minibatch_rows(rows_total, config.mini_batch_size, gen, first_row, B):
                    optimizer.zero_grad(set_to_none=True)
                    step_stats = _minibatch_backward(policy, value_head, config, mb, ids, attn, Tr, mask,
                                                     old_logprobs, old_values, advantages, returns)
                    if ptx is not None:  # PPO-ptx: the demonstrations' token NLL under the policy
                        ptx_loss = ptx.loss(policy)
                        (config.ptx_coef * ptx_loss / world).backward()  # summed over ranks below
                        stats.setdefault("ppo/loss/ptx", []).append(float(ptx_loss.detach()))
                    distributed.sum_gradients(params)
                    step_stats["ppo/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                    optimizer.step()
                    for key, value in step_stats.items():
                        stats[key].append(value)
            # 8 log; β follows the KL actually penalised (every rank's answers: the same β on all).
            row = {k: sum(v) / len(v) for k, v in stats.items()}
            row.update({
                "objective/kl": float(kl.sum(dim=1).mean()),
                "objective/reward": float(raw.mean()),
                "objective/score": float(score.mean()),
                "objective/rlhf_reward": float((score - beta * kl.sum(dim=1)).mean()),
                "objective/entropy": float((-old_logprobs * mask).sum(dim=1).mean()),
                "answer/length_tokens": float(ro.lengths.float().mean()),
                "answer/no_eos_rate": float((~ro.ended).float().mean()),
            })
            row = distributed.mean_floats(row)
            kl_per_answer = row["objective/kl"]
            kl_ctl.update(kl_per_answer, len(idx))
            history.append(row)
            if progress:
                iterator.set_postfix(reward=f"{row['objective/reward']:.3f}", kl=f"{kl_per_answer:.2f}")
            stop = on_iteration is not None and bool(on_iteration(step + 1, len(batches)))
            if distributed.agree(stop):  # rank 0's progress decides for every rank
                break
    finally:
        optimizer.zero_grad(set_to_none=True)
        restore_requires_grad(policy, flags)
        policy.train(was_training)
    metrics = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    metrics["objective/kl_coef"] = kl_ctl.value
    metrics["objective/reward_first"] = history[0]["objective/reward"]
    metrics["objective/reward_last"] = history[-1]["objective/reward"]
    metrics["objective/kl_last"] = history[-1]["objective/kl"]  # KL grows within a round: the mean understates the end
    if normalizer is not None:
        metrics["objective/ref_score_mean"] = normalizer.mean
        metrics["objective/ref_score_std"] = normalizer.std
    metrics["ppo/samples"] = float(sum(len(b) for b in batches[:len(history)]))
    metrics["ppo/iterations"] = float(len(history))
    metrics["ppo/stopped_early"] = float(len(history) < len(batches))
    metrics["time/ppo_s"] = time.time() - t0
    summary = ", ".join(f"{k}={metrics[k]:.3g}" for k in (
        "objective/reward", "objective/kl", "objective/kl_coef", "ppo/clipfrac",
        "answer/length_tokens", "time/ppo_s"))
    log.info("PPO round done: %s", summary)
    if progress:
        print(f"PPO: {summary}")
    if any(math.isnan(v) for v in metrics.values() if isinstance(v, float)):
        log.warning("PPO metrics contain NaN: %s", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Command line: one PPO round against a saved reward model; saves the adapter."""
    parser = argparse.ArgumentParser(description="PPO on a LoRA adapter against a saved reward model.")
    parser.add_argument("--model", required=True, help="base model: hub id or local directory")
    parser.add_argument("--rm", required=True, help="reward model directory (python -m training.reward_training)")
    parser.add_argument("--prompts", required=True, help='JSONL, one {"messages": [...]} a line')
    parser.add_argument("--out", required=True, help="directory to save the trained adapter to")
    parser.add_argument("--adapter", default=None, help="adapter to start from (default: a fresh one)")
    add_dataclass_args(parser, PPOConfig)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(PPOConfig, args)
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [json.loads(line)["messages"] for line in f if line.strip()]
    except (ValueError, OSError, KeyError) as exc:
        parser.error(f"{exc.__class__.__name__}: {exc}")
    from training.models import add_lora, load_lora, load_model_and_tokenizer
    from training.reward_model import RewardModel
    from training.reward_training import make_reward_fn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model, tokenizer = load_model_and_tokenizer(args.model)
    policy = load_lora(model, args.adapter, trainable=True) if args.adapter else add_lora(model)
    rm = RewardModel.load(args.model, args.rm)
    metrics = ppo_train(policy, tokenizer, make_reward_fn(rm, tokenizer), prompts, config, progress=True)
    policy.save_pretrained(args.out)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
