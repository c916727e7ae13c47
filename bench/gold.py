"""The gold evaluation shared by the benchmarks (``bench.online_loop``, ``bench.ppo_replay``):
an adapter against version 0 on held-out prompts, one pure temperature-1 answer each per prompt,
judged by the annotator without noise (Ziegler et al. 2019; AlpacaFarm, Dubois et al. 2023).

A win rate over n prompts is the mean of per-prompt outcomes (1 win, ½ tie, 0 loss); its standard
error is reported beside it, so that two runs, or a run and a target, can be told apart from
sampling noise (on 240 prompts it is about 0.02).
"""

from __future__ import annotations

import math
import random
import time

EXAMPLES = 6  # adapter vs version-0 answers shown in the result


def standard_error(outcomes: list[float]) -> float:
    """Standard error of the mean of ``outcomes`` (e.g. per-prompt 1 / ½ / 0): the sample
    standard deviation (n − 1) over √n. NaN for fewer than two outcomes."""
    n = len(outcomes)
    if n < 2:
        return float("nan")
    mean = sum(outcomes) / n
    return math.sqrt(sum((x - mean) ** 2 for x in outcomes) / (n - 1) / n)


def judge_pair(annotator, messages, x: str, y: str, rng: random.Random) -> float:
    """1 if the annotator prefers ``x`` over ``y``, ½ on a tie, else 0 (x shown as A or B at
    random); for a :class:`bench.annotators.Population`, its members' judgements averaged by weight."""
    if hasattr(annotator, "members"):
        return sum(w * judge_pair(fn, messages, x, y, rng) for _, fn, w in annotator.members)
    if rng.random() < 0.5:
        verdict = annotator(messages, x, y)
        return {"a": 1.0, "tie": 0.5}.get(verdict, 0.0)
    verdict = annotator(messages, y, x)
    return {"b": 1.0, "tie": 0.5}.get(verdict, 0.0)


def gold_figures(policy, tokenizer, annotator, prompts: list[list[dict]], adapter: str, baseline: str,
                 rm=None, seed: int = 0, max_new_tokens: int = 48) -> dict:
    """Adapter ``adapter`` of ``policy`` against adapter ``baseline`` (version 0), one
    temperature-1 answer each per prompt, judged by ``annotator`` without noise.

    Returns:
        ``gold_win_rate`` (wins + ½ ties over n) and ``gold_win_rate_se`` (its standard error,
        :func:`standard_error`), ``kl_nats`` (mean k1 KL per answer of ``adapter`` to the
        reference, i.e. the adapter disabled; nats), ``answer_tokens_live`` / ``answer_tokens_v0``
        (mean answer length, tokens), ``eval_n``, ``eval_s`` (seconds), ``examples``; with a
        reward model ``rm`` also ``gold_win_rate_bon4`` (its best of 4 answers of ``baseline``
        against ``baseline``) with ``gold_win_rate_bon4_se``, and ``rm_gold_accuracy`` (how often
        it agrees with the annotator on the pairs the annotator separates), else NaN.
    """
    import torch

    from training.chat_format import end_of_turn_ids
    from training.reward_training import score
    from training.rollout import answer_kl, generate_rollouts
    from training.seeds import derive_seed

    policy.eval()
    eos = end_of_turn_ids(policy, tokenizer)
    n, B = len(prompts), 32

    def sample(name: str, row_seed: int, with_kl: bool = False):
        policy.set_adapter(name)
        answers, kls, lengths = [], [], []
        for s in range(0, n, B):
            chunk = prompts[s:s + B]
            with torch.no_grad():
                ro = generate_rollouts(policy, tokenizer, chunk, max_new_tokens, eos, seed=row_seed + s)
                answers += ro.answers
                lengths += ro.lengths.tolist()
                if with_kl:
                    kls += answer_kl(policy, ro).tolist()  # (b,) nats
        return answers, kls, lengths

    t0 = time.time()
    live_answers, kls, live_len = sample(adapter, derive_seed(seed, "gold/candidate"), with_kl=True)
    v0_answers, _, v0_len = sample(baseline, derive_seed(seed, "gold/baseline"))
    rng = random.Random(derive_seed(seed, "gold/judge"))
    wins = [judge_pair(annotator, p, x, y, rng) for p, x, y in zip(prompts, live_answers, v0_answers, strict=True)]
    result = {"gold_win_rate": sum(wins) / n, "gold_win_rate_se": standard_error(wins),
              "kl_nats": sum(kls) / n, "eval_n": n, "answer_tokens_live": sum(live_len) / n, "answer_tokens_v0": sum(v0_len) / n}
    if rm is not None:
        candidates = [sample(baseline, derive_seed(seed, "gold/best-of-4", k))[0] for k in range(4)]
        scores = torch.stack([score(rm, tokenizer, prompts, c) for c in candidates])  # (4, n)
        best = scores.argmax(dim=0).tolist()
        bon = [candidates[k][i] for i, k in enumerate(best)]
        bon_wins = [judge_pair(annotator, p, x, y, rng) for p, x, y in zip(prompts, bon, v0_answers, strict=True)]
        result["gold_win_rate_bon4"] = sum(bon_wins) / n
        result["gold_win_rate_bon4_se"] = standard_error(bon_wins)
        # how often the reward model agrees with the gold judgement on the pairs it separates
        s_live, s_v0 = score(rm, tokenizer, prompts, live_answers), score(rm, tokenizer, prompts, v0_answers)
        agree = [(w == 1.0) == bool(a > b) for w, a, b in zip(wins, s_live, s_v0, strict=True) if w != 0.5]
        result["rm_gold_accuracy"] = sum(agree) / len(agree) if agree else float("nan")
    else:
        result["gold_win_rate_bon4"] = result["gold_win_rate_bon4_se"] = float("nan")
        result["rm_gold_accuracy"] = float("nan")
    result["eval_s"] = time.time() - t0
    result["examples"] = [{"prompt": p[-1]["content"], "live": x, "v0": y}
                          for p, x, y in list(zip(prompts, live_answers, v0_answers, strict=True))[:EXAMPLES]]
    return result
