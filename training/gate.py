"""Promotion gate: a candidate adapter goes live only if it beats the live one without cheating.

On held-out prompts, the candidate must

1. win against the live version, as judged by the reward model (wins + ½ ties over n), at a rate
   of at least ``min_win_rate``;
2. stay close to the reference: mean KL per answer (k1, nats) at most ``max_kl``;
3. not collapse, across prompts: distinct answers to different prompts at least
   ``min_distinct`` of them; nor within a prompt: each prompt is sampled
   ``samples_per_prompt`` times, and the share of a prompt's extra samples that differ from
   the ones before, ``(distinct − 1) / (samples − 1)`` averaged over prompts, must keep at least
   ``min_within_ratio`` of live's (a policy with one fixed answer per prompt scores 0);
4. not grow long: mean answer length at most ``max_length_ratio`` × the live version's
   (+ ``length_slack_tokens``), the classic reward-hacking symptom (Singhal et al. 2023,
   "A Long Way to Go: Investigating Length Correlations in RLHF"); and not run into the
   length limit more often: its share of answers cut at ``max_new_tokens`` at most live's +
   ``max_truncated_increase`` (a mean length says nothing of answers that never end);
5. change something: a candidate whose LoRA update (``B·A·scaling`` of every layer) equals
   live's — byte-identical weights, or an all-zero ``B`` against a live version that is the
   base — serves exactly what live serves and is rejected before any sampling
   (:func:`adapter_difference`);
6. have been trained against a reward model that is right on held-out votes more often than
   ``min_rm_accuracy`` (default ½: better than chance), with confidence: the bar applies to the
   Wilson score interval's lower bound (Wilson 1927; Brown, Cai & DasGupta 2001) at
   ``z = rm_accuracy_z`` over the ``n`` held-out A/B votes, so one held-out vote, or a handful,
   neither passes a reward model by luck nor fails a good one by noise (:func:`rm_accuracy_check`,
   called by ``training.round`` with the RM's accuracy on held-out votes it was *not* selected
   on). PPO against a reward model at chance only drifts, and the same model would judge check 1.

:func:`gate_decision` is the pure rule on precomputed figures; :func:`run_gate` samples both
adapters of one ``PeftModel`` and applies it. Library only; ``training.round`` records the
result's ``reason`` when a candidate is rejected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from training.flags import help_field
from training.models import requires_grad_flags, restore_requires_grad
from training.rollout import answer_kl, generate_rollouts, reference_model


@dataclass
class GateConfig:
    """Thresholds of the promotion gate."""

    enabled: bool = help_field(True, help="promote only candidates that pass the gate; false: publish every trained adapter live")
    min_win_rate: float = help_field(
        0.5, help="RM-judged win rate vs live (ties count ½) needed. ½: a candidate that the newest reward "
        "model (trained on more votes than live's) judges no worse than live is promoted")
    max_kl: float = help_field(5.0, help="largest mean KL per answer to the reference, nats")
    min_distinct: float = help_field(0.5, help="smallest share of distinct answers across prompts")
    min_within_ratio: float = help_field(
        0.25, help="smallest share of live's diversity within a prompt the candidate keeps (the share of a "
        "prompt's extra samples that differ; 0: not checked)")
    samples_per_prompt: int = help_field(2, help="answers sampled per held-out prompt and version (>= 2: the within-prompt check)")
    max_length_ratio: float = help_field(1.5, help="largest mean answer length relative to live")
    length_slack_tokens: float = help_field(4.0, help="tokens allowed on top of the length ratio")
    max_truncated_increase: float = help_field(
        0.1, help="largest rise over live's share of answers cut at the length limit (0.1: ten points)")
    min_rm_accuracy: float = help_field(0.5, help="the reward model's held-out pairwise accuracy, Wilson lower bound, must exceed this before its candidate can be promoted (no held-out votes: not checked)")
    rm_accuracy_z: float = help_field(1.28, help="z of that lower bound (1.28: a 90 percent one-sided bound; 0: the plain accuracy)")
    n_prompts: int = help_field(128, help="answers sampled per version: n-prompts / samples-per-prompt distinct held-out prompts, fewer cycled (new seed per row)")
    max_new_tokens: int = help_field(48, help="answer length limit, tokens")
    seed: int = help_field(0, help="sampling seed (the same for both versions; row i uses seed + i)")
    changes: int = help_field(
        6, help="held-out prompts whose live and candidate answers are kept with the published version, "
        "for admins to see what training changed (0: none)")

    def __post_init__(self):
        if not 0.0 <= self.min_win_rate <= 1.0:
            raise ValueError(f"GateConfig.min_win_rate must be in [0, 1], got {self.min_win_rate}")
        if not 0.0 <= self.min_rm_accuracy <= 1.0:
            raise ValueError(f"GateConfig.min_rm_accuracy must be in [0, 1], got {self.min_rm_accuracy}")
        if self.rm_accuracy_z < 0:
            raise ValueError(f"GateConfig.rm_accuracy_z must be >= 0, got {self.rm_accuracy_z}")
        for name in ("min_distinct", "min_within_ratio", "max_truncated_increase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"GateConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"GateConfig.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        for name in ("max_kl", "max_length_ratio", "n_prompts", "max_new_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GateConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.length_slack_tokens < 0:
            raise ValueError(f"GateConfig.length_slack_tokens must be >= 0, got {self.length_slack_tokens}")
        if self.changes < 0:
            raise ValueError(f"GateConfig.changes must be >= 0, got {self.changes}")


@dataclass
class GateResult:
    """``passed``; ``reason`` ("" when passed, else every failed check, "; "-joined); metrics;
    ``samples``: what changed on a few held-out prompts (:func:`run_gate`; empty from
    :func:`gate_decision`), each ``{"messages", "before", "after", "before_reward",
    "after_reward"}``: the prompt (``{role, content}`` messages ending with a user turn), live's
    and the candidate's answer (raw text) and the reward model's raw score of each."""

    passed: bool
    reason: str
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def wilson_interval(successes: float, n: float, z: float) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a proportion: ``successes`` of ``n`` trials
    (a tie may count ½, so ``successes`` may be fractional), each bound one-sided at ``z``
    standard deviations (z = 1.645: 95 % one-sided; 0: the plain share). Unlike the normal
    approximation it never claims certainty from a few trials: 1 of 1 at z = 1.28 gives
    (0.38, 1). Wilson 1927; Brown, Cai & DasGupta 2001. ``n = 0`` gives (0, 1).

    Raises:
        ValueError: ``successes`` outside [0, n] or ``z < 0``.
    """
    if z < 0:
        raise ValueError(f"z must be >= 0, got {z}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    low, high = proportion_confint(successes, n, alpha=2.0 * float(norm.sf(z)), method="wilson")
    return float(low), float(high)


def rm_accuracy_check(accuracy: float | None, n: int, config: GateConfig) -> str:
    """Check 5: ``""`` when the reward model in use is accurate enough, else the reason.

    Args:
        accuracy: share of the ``n`` held-out A/B votes (ties excluded) the reward model orders
            like the voter; None or NaN (no held-out votes): not checked.
        n: how many held-out A/B votes that share is over.

    The bar applies to the Wilson lower bound (:func:`wilson_interval`, ``z =
    config.rm_accuracy_z``) of ``accuracy·n`` right of ``n``; it must be above
    ``config.min_rm_accuracy``.
    """
    if accuracy is None or math.isnan(accuracy) or n <= 0:
        return ""
    bound, _ = wilson_interval(min(max(accuracy * n, 0.0), n), n, config.rm_accuracy_z)
    if bound > config.min_rm_accuracy:
        return ""
    return (f"reward model not yet reliably better than {config.min_rm_accuracy:.2f} on held-out votes: "
            f"accuracy {accuracy:.2f} over {n} A/B votes, lower bound {bound:.2f}")


def within_prompt_diversity(answers: list[str], prompt_ids: list[int]) -> float | None:
    """How much a policy still varies its answer to one prompt: for each prompt with at least
    two samples, ``(distinct answers − 1) / (samples − 1)`` (0: always the same answer; 1: every
    sample differs), averaged over those prompts; None when no prompt has two samples."""
    by_prompt: dict[int, list[str]] = {}
    for pid, answer in zip(prompt_ids, answers, strict=True):
        by_prompt.setdefault(pid, []).append(answer.strip())
    shares = [(len(set(a)) - 1) / (len(a) - 1) for a in by_prompt.values() if len(a) >= 2]
    return sum(shares) / len(shares) if shares else None


def gate_decision(
    candidate_scores: torch.Tensor, live_scores: torch.Tensor, candidate_answers: list[str],
    candidate_kl: torch.Tensor, candidate_lengths: torch.Tensor, live_lengths: torch.Tensor,
    config: GateConfig, prompt_ids: list[int] | None = None, live_answers: list[str] | None = None,
    candidate_truncated: torch.Tensor | None = None, live_truncated: torch.Tensor | None = None,
) -> GateResult:
    """Apply the gate to figures measured on N held-out rows (one answer each, paired).

    Args:
        candidate_scores, live_scores: (N,) reward-model scores of the paired answers.
        candidate_answers: N candidate answers, to different prompts (or see ``prompt_ids``).
        prompt_ids: (N,) which prompt each row answers, when prompts repeat; the collapse check
            across prompts then counts distinct answers over the first answer to each prompt,
            and the check within a prompt compares the candidate's
            :func:`within_prompt_diversity` with live's (``live_answers``, the same rows).
        candidate_kl: (N,) KL per candidate answer to the reference, nats.
        candidate_lengths, live_lengths: (N,) answer lengths, tokens.
        candidate_truncated, live_truncated: (N,) bool, the answer was cut at the length limit
            (it never ended); both given: the truncation check.

    Returns:
        :class:`GateResult` with metrics ``gate/win_rate``, ``gate/kl``, ``gate/distinct``,
        ``gate/length_tokens``, ``gate/live_length_tokens``, ``gate/n``, and when measured
        ``gate/within_diversity``, ``gate/live_within_diversity``, ``gate/truncated``,
        ``gate/live_truncated``.

    Raises:
        ValueError: empty or mismatched inputs.
    """
    n = len(candidate_answers)
    sizes = {len(candidate_scores), len(live_scores), len(candidate_kl), len(candidate_lengths), len(live_lengths)}
    sizes |= {len(x) for x in (prompt_ids, live_answers, candidate_truncated, live_truncated) if x is not None}
    if n == 0 or sizes != {n}:
        raise ValueError(f"gate inputs must all hold the same N > 0 entries, got {sizes | {n}}")
    diff = torch.as_tensor(candidate_scores, dtype=torch.float64) - torch.as_tensor(live_scores, dtype=torch.float64)
    win_rate = float(((diff > 1e-6).double() + 0.5 * (diff.abs() <= 1e-6).double()).mean())
    kl = float(torch.as_tensor(candidate_kl, dtype=torch.float64).mean())
    if prompt_ids is None:
        firsts = list(candidate_answers)
    else:
        firsts = list({pid: a for pid, a in reversed(list(zip(prompt_ids, candidate_answers, strict=True)))}.values())
    distinct = len({a.strip() for a in firsts}) / len(firsts)
    length = float(torch.as_tensor(candidate_lengths, dtype=torch.float64).mean())
    live_length = float(torch.as_tensor(live_lengths, dtype=torch.float64).mean())
    max_length = config.max_length_ratio * live_length + config.length_slack_tokens
    metrics = {"gate/win_rate": win_rate, "gate/kl": kl, "gate/distinct": distinct,
               "gate/length_tokens": length, "gate/live_length_tokens": live_length, "gate/n": n}
    reasons = []
    if win_rate < config.min_win_rate:
        reasons.append(f"win rate {win_rate:.3f} vs live is below {config.min_win_rate:.3f}")
    if kl > config.max_kl:
        reasons.append(f"KL to the reference {kl:.2f} nats exceeds {config.max_kl:.2f}")
    if distinct < config.min_distinct:
        reasons.append(f"collapsed: only {distinct:.0%} distinct answers across {len(firsts)} prompts "
                       f"(need {config.min_distinct:.0%})")
    if prompt_ids is not None and live_answers is not None:
        within = within_prompt_diversity(candidate_answers, prompt_ids)
        live_within = within_prompt_diversity(live_answers, prompt_ids)
        if within is not None and live_within is not None:
            metrics.update({"gate/within_diversity": within, "gate/live_within_diversity": live_within})
            if within < config.min_within_ratio * live_within:
                reasons.append(f"collapsed within prompts: {within:.0%} of repeated samples differ, live "
                               f"{live_within:.0%} (need {config.min_within_ratio:.0%} of live's)")
    if length > max_length:
        reasons.append(f"answers grew: mean {length:.1f} tokens vs live {live_length:.1f} "
                       f"(limit {max_length:.1f})")
    if candidate_truncated is not None and live_truncated is not None:
        cut = float(torch.as_tensor(candidate_truncated, dtype=torch.float64).mean())
        live_cut = float(torch.as_tensor(live_truncated, dtype=torch.float64).mean())
        metrics.update({"gate/truncated": cut, "gate/live_truncated": live_cut})
        if cut > live_cut + config.max_truncated_increase:
            reasons.append(f"answers cut at the length limit: {cut:.0%} vs live {live_cut:.0%} "
                           f"(at most {config.max_truncated_increase:.0%} more)")
    return GateResult(not reasons, "; ".join(reasons), metrics)


@torch.no_grad()
def adapter_difference(policy, candidate_adapter: str, live_adapter: str | None) -> float:
    """The largest absolute entry of (candidate's − live's) weight update over every LoRA
    layer of ``policy``, an update being ``lora_B · lora_A · scaling`` (Hu et al. 2021, LoRA);
    ``live_adapter=None``: against the reference (no update). 0.0 exactly when the candidate
    changes nothing that live serves. Layers where neither adapter is present count 0."""
    from peft.tuners.lora import LoraLayer

    def update(layer, name):
        if name is None or name not in layer.lora_A:
            return None
        a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
        return (b @ a) * float(layer.scaling[name])

    largest = 0.0
    for layer in policy.modules():
        if not isinstance(layer, LoraLayer):
            continue
        cand, live = update(layer, candidate_adapter), update(layer, live_adapter)
        if cand is None and live is None:
            continue
        diff = (cand if cand is not None else 0) - (live if live is not None else 0)
        largest = max(largest, float(torch.as_tensor(diff).abs().max()))
    return largest


@torch.no_grad()
def run_gate(
    policy, tokenizer, reward_fn: Callable[[list[list[dict]], list[str]], torch.Tensor],
    prompts: list[list[dict]], config: GateConfig, candidate_adapter: str,
    live_adapter: str | None = None,
) -> GateResult:
    """Sample the candidate and the live adapter of ``policy`` on held-out ``prompts`` (the
    first ``config.n_prompts // config.samples_per_prompt`` distinct ones, cycled to
    ``config.n_prompts`` rows, each row with its own seed, the same for both versions), score
    both with ``reward_fn`` and apply :func:`gate_decision`. ``live_adapter=None`` compares against the reference (adapters
    disabled). The active adapter and every ``requires_grad`` flag are restored afterwards.

    A candidate whose weights change nothing (:func:`adapter_difference` is 0) is rejected
    without sampling (no ``samples``). Otherwise the result's ``samples`` are the first
    ``config.changes`` distinct prompts with the first answer of each version to them (rows
    ``0 … k−1``, which are distinct prompts; the same seeds for both versions), in the order
    of ``prompts``.

    Raises:
        ValueError: no prompts, or an adapter name the policy does not hold.
    """
    seen, chosen = set(), []
    for p in prompts:
        key = repr(p)
        if key not in seen:
            seen.add(key)
            chosen.append(p)
        if len(chosen) == max(1, config.n_prompts // config.samples_per_prompt):
            break
    if not chosen:
        raise ValueError("run_gate needs at least one held-out prompt")
    # few held-out prompts: sample each again (a row seed of its own) for a steadier win rate
    prompt_ids = [i % len(chosen) for i in range(config.n_prompts)]
    chosen = [chosen[i] for i in prompt_ids]
    names = set(getattr(policy, "peft_config", {}))
    for name in (candidate_adapter, live_adapter):
        if name is not None and name not in names:
            raise ValueError(f"the policy has no adapter {name!r}; it holds {sorted(names)}")
    change = adapter_difference(policy, candidate_adapter, live_adapter)
    if change == 0.0:
        return GateResult(False, "the candidate's weights do not differ from live's (identical LoRA updates): it "
                          "would serve exactly what live serves", {"gate/weight_change": 0.0})
    active = policy.active_adapter
    flags = requires_grad_flags(policy)
    try:
        policy.set_adapter(candidate_adapter)
        cand = generate_rollouts(policy, tokenizer, chosen, config.max_new_tokens, seed=config.seed)
        kl = answer_kl(policy, cand)  # (N,) nats
        if live_adapter is None:
            with reference_model(policy):
                live = generate_rollouts(policy, tokenizer, chosen, config.max_new_tokens, seed=config.seed)
        else:
            policy.set_adapter(live_adapter)
            live = generate_rollouts(policy, tokenizer, chosen, config.max_new_tokens, seed=config.seed)
    finally:
        policy.set_adapter(active)
        restore_requires_grad(policy, flags)
    cand_scores = torch.as_tensor(reward_fn(chosen, cand.answers), dtype=torch.float32).flatten()
    live_scores = torch.as_tensor(reward_fn(chosen, live.answers), dtype=torch.float32).flatten()
    result = gate_decision(cand_scores, live_scores, cand.answers, kl, cand.lengths.float(),
                           live.lengths.float(), config, prompt_ids=prompt_ids, live_answers=live.answers,
                           candidate_truncated=~cand.ended, live_truncated=~live.ended)
    result.metrics["gate/weight_change"] = change
    distinct = len(set(prompt_ids))  # rows 0 … distinct − 1 are the first sample of each prompt
    result.samples = [
        {"messages": [dict(m) for m in chosen[i]], "before": live.answers[i], "after": cand.answers[i],
         "before_reward": float(live_scores[i]), "after_reward": float(cand_scores[i])}
        for i in range(min(config.changes, distinct))
    ]
    return result
