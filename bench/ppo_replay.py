"""Replay a training round offline on a data dir's stored votes and prompts, then score it with
the gold judgement: a benchmark of the reward model and of PPO without the noise of the online
loop (which prompts users sent, which answers they saw, which votes were flipped).

    python -m bench.online_loop --data-dir runs/corr ...      # keeps the run's data dir
    python -m bench.ppo_replay --data-dir runs/corr --annotator bench.annotators:prefers_correct
    python -m bench.ppo_replay --data-dir runs/corr --annotator ... --reward gold --round.ppo.lr 1e-3

What it does:
  1. reads the data dir with the round's own steps (``training.round.load_inputs`` and
     ``load_model``): all votes; PPO prompts from the stored conversations, split by conversation;
  2. builds the reward (``--reward``):
       * ``rm`` — a reward model trained from the base weights on all votes (the round's fresh
         candidate, ``training.reward_training.train_reward_model``);
       * ``gold`` — the annotator's own verdict, without noise: each answer is judged against
         ``--gold-refs`` answers of the reference policy to the same prompt (drawn once, before
         PPO), 1 for a win, ½ for a tie, 0 for a loss, averaged. This is the win rate the online
         benchmark measures, as a per-answer score: what PPO reaches with a perfect reward model;
  3. improves a policy adapter exactly as a round does (``training.round.starting_policy`` and
     ``improve_policy``: rejection sampling if ``--round.rs.n`` > 1, then PPO), from a fresh
     adapter on the reference policy even though a round's default continues the live adapter
     (``--init-policy live``: from the data dir's live adapter), with the round settings
     ``--round.*`` (the flags of ``python -m training.jobs``; β starts at
     ``--round.ppo.init-kl-coef``, it does not carry over from the data dir's rounds);
     ``--rounds N`` repeats this N times, each round continuing the last one's adapter;
  4. scores the new adapter (after each round) against version 0 like ``bench.online_loop`` (``gold_win_rate``,
     ``kl_nats``, and with ``--reward rm`` also ``gold_win_rate_bon4`` and ``rm_gold_accuracy``)
     on the same held-out prompts (``--prompts``, ``--eval-prompts``, ``--seed`` as given to the
     online benchmark).

Prints progress, then one JSON object (also written to ``--json``). Nothing in the data dir is
changed: no version is published, no reward model saved.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.gold import gold_figures, judge_pair
from bench.online_loop import BenchConfig, load_annotator, load_prompts, resolve_model
from training.flags import add_dataclass_args, dataclass_from_args, help_field, nested
from training.round import RoundConfig
from training.seeds import derive_seed


@dataclass
class ReplayConfig:
    """Flags of ``python -m bench.ppo_replay``."""

    data_dir: str = help_field("", help="the app data dir to replay (chat.db and adapters/; e.g. a bench.online_loop --data-dir)")
    annotator: str = help_field("bench.annotators:prefers_correct", help="MODULE:FUNCTION, (messages, a, b) -> 'a'|'b'|'tie'")
    reward: str = help_field("rm", choices=["rm", "gold"], help="rm: a reward model trained on the stored votes; "
                             "gold: the annotator's noise-free verdict against reference answers")
    gold_refs: int = help_field(2, help="reference answers per prompt each answer is judged against (--reward gold)")
    model: str = help_field("", help="base model dir or hub id (default: the offline starter, cached in data/starter)")
    prompts: str = help_field("", help="JSONL of prompts, as given to bench.online_loop (default: the starter's held-out prompts)")
    eval_prompts: int = help_field(240, help="held-out prompts for the gold evaluation")
    eval_max_new_tokens: int = help_field(48, help="answer length limit in the evaluation, tokens")
    seed: int = help_field(0, help="the online benchmark's --seed (evaluation prompts and sampling) and the round's seed")
    threads: int = help_field(0, help="torch threads (0: all cores)")
    rounds: int = help_field(1, help="rounds in a row, each continuing the last one's adapter (as the app's rounds "
                             "do online, every round promoted); the votes, and so the reward, stay the same")
    init_policy: str = help_field("reference", choices=["reference", "live"],
                                  help="where the replayed round starts: a fresh adapter on the reference (SFT) "
                                  "policy, or the data dir's live adapter (a round's default)")
    round: RoundConfig = nested(RoundConfig, help="the replayed round's settings (the flags of python -m training.jobs)",
                                set_by_parent=("data_dir", "model", "seed", "init_policy"))
    json: str = help_field("", help="also write the result JSON here")

    def __post_init__(self):
        if not self.data_dir:
            raise ValueError("--data-dir is required (an app data dir with votes, e.g. from bench.online_loop --data-dir)")
        if ":" not in self.annotator:
            raise ValueError(f"--annotator must be MODULE:FUNCTION, got {self.annotator!r}")
        if self.reward not in ("rm", "gold"):
            raise ValueError(f"--reward must be 'rm' or 'gold', got {self.reward!r}")
        for name in ("gold_refs", "eval_prompts", "eval_max_new_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        self.round = replace(self.round, data_dir=self.data_dir, model=self.model, seed=self.seed,
                             init_policy=self.init_policy)


def gold_reward_fn(annotator, policy, tokenizer, prompts: list[list[dict]], refs: int,
                   max_new_tokens: int, seed: int):
    """A noise-free reward from a pairwise annotator: ``reward_fn(prompts, answers) -> (B,)``
    scores in [0, 1], each answer's mean verdict (win 1, tie ½, loss 0; shown as A or B at
    random) against ``refs`` answers of the reference policy (``policy`` with its adapters
    disabled) to the same prompt, drawn here, once, for every prompt in ``prompts``.

    Raises:
        KeyError: the returned function is called with a prompt that was not in ``prompts``.
    """
    import torch

    from training.chat_format import end_of_turn_ids
    from training.rollout import generate_rollouts, reference_model

    def key(messages: list[dict]) -> str:
        return json.dumps(messages, sort_keys=True)

    eos = end_of_turn_ids(policy, tokenizer)
    references: dict[str, list[str]] = {key(p): [] for p in prompts}
    distinct = list({key(p): p for p in prompts}.values())
    policy.eval()
    for k in range(refs):
        for s in range(0, len(distinct), 32):
            chunk = distinct[s:s + 32]
            with torch.no_grad(), reference_model(policy):
                answers = generate_rollouts(policy, tokenizer, chunk, max_new_tokens, eos,
                                            seed=derive_seed(seed, "bench/gold-ref", k, s)).answers
            for p, a in zip(chunk, answers, strict=True):
                references[key(p)].append(a)
    rng = random.Random(seed)

    def reward_fn(batch: list[list[dict]], answers: list[str]) -> torch.Tensor:
        out = []
        for p, a in zip(batch, answers, strict=True):
            refs_p = references[key(p)]
            out.append(sum(judge_pair(annotator, p, a, r, rng) for r in refs_p) / len(refs_p))
        return torch.tensor(out, dtype=torch.float32)

    return reward_fn


def read_data_dir(config: ReplayConfig):
    """``(registry, inputs)``: the data dir's adapter registry and what a round would train on
    (``training.round.load_inputs``). Nothing is written.

    Raises:
        ValueError: not an app's data dir, no version 0, too few votes or no stored prompts.
    """
    from storage.paths import DataDir, DataDirError
    from storage.registry import AdapterRegistry
    from storage.store import open_store
    from training.round import SkipRound, load_inputs

    try:
        data_dir = DataDir(config.data_dir).require()
    except DataDirError as exc:
        raise ValueError(f"{exc} (the data dir of an app or of bench.online_loop --data-dir)") from None
    store = open_store(data_dir)
    if store.live_version() is None:
        raise ValueError(f"{data_dir.root}: no published version 0 (start the app on it once)")
    try:
        return AdapterRegistry(data_dir, store), load_inputs(config.round, store)
    except SkipRound as skip:
        raise ValueError(f"{data_dir.root}: {skip}") from None


def run(config: ReplayConfig) -> dict:
    """Replay one round on ``config.data_dir`` and score it (see the module docstring).

    Raises:
        ValueError: the data dir has no votes usable for a reward model (``--reward rm``), no
            stored prompts, or no version 0.
    """
    import torch

    from training.models import load_lora
    from training.reward_training import make_reward_fn, train_reward_model
    from training.round import improve_policy, load_model, starting_policy

    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    annotator = load_annotator(config.annotator)
    round_config = config.round
    registry, inputs = read_data_dir(config)
    model_ref = resolve_model(config, log)  # after the checks: it may build the starter first
    round_config = replace(round_config, model=model_ref)
    _, eval_prompts = load_prompts(BenchConfig(prompts=config.prompts, eval_prompts=config.eval_prompts,
                                               seed=config.seed))
    model, tokenizer, window, inputs = load_model(round_config, inputs)
    ppo_prompts, pairs = inputs.ppo_prompts, inputs.pairs
    log(f"{len(ppo_prompts)} PPO prompts, {len(eval_prompts)} evaluation prompts, reward: {config.reward}")

    policy = starting_policy(model, round_config, registry, inputs.live)
    rm, metrics = None, {}
    if config.reward == "rm":  # the round's fresh reward-model candidate, on the policy's base
        rm, metrics = train_reward_model(policy, tokenizer, pairs, round_config.reward)
        reward_fn = make_reward_fn(rm, tokenizer)
        log(f"reward model: held-out accuracy {metrics['rm/accuracy']:.3f} on {metrics['rm/heldout_decisive']:.0f} pairs")
    if config.reward == "gold":
        reward_fn = gold_reward_fn(annotator, policy, tokenizer, ppo_prompts, config.gold_refs,
                                   round_config.ppo.max_new_tokens, derive_seed(config.seed, "bench/gold-refs"))
        log(f"gold reward: {config.gold_refs} reference answers for each PPO prompt")
    load_lora(policy, registry.path(0), adapter_name="v0")  # the evaluation's baseline, never trained
    keep = ("rm/accuracy", "rm/heldout_decisive", "rm/train_pairs", "objective/kl", "objective/kl_last",
            "objective/kl_coef", "objective/reward_first", "objective/reward_last", "objective/score",
            "objective/ref_score_mean", "objective/ref_score_std", "answer/length_tokens", "ppo/samples", "rs/kl")
    per_round, train_s = [], 0.0
    for r in range(config.rounds):
        # each round continues the last one's adapter, with β where it ended and new prompt order
        if r:
            round_config = replace(round_config, seed=round_config.seed + 1,
                                   ppo=replace(round_config.ppo, init_kl_coef=metrics["objective/kl_coef"]))
        policy.set_adapter("policy")
        t_train = time.time()
        metrics.update(improve_policy(policy, tokenizer, reward_fn, ppo_prompts, round_config, window))
        train_s += time.time() - t_train
        log(f"round {r + 1}/{config.rounds} trained in {time.time() - t_train:.0f} s; evaluating against version 0")
        gold = gold_figures(policy, tokenizer, annotator, eval_prompts, "policy", "v0", rm=rm, seed=config.seed,
                            max_new_tokens=config.eval_max_new_tokens)
        per_round.append({"gold_win_rate": gold["gold_win_rate"], "kl_nats": gold["kl_nats"],
                          **{k: metrics[k] for k in keep if k in metrics}})
        log(f"round {r + 1}: gold win rate {gold['gold_win_rate']:.3f} ± {gold['gold_win_rate_se']:.3f}, "
            f"KL {gold['kl_nats']:.2f} nats")
    return {
        "reward": config.reward, "annotator": config.annotator, "pairs": len(pairs),
        "ppo_prompts": len(ppo_prompts), **{k: v for k, v in gold.items() if k != "examples"},
        "train_s": train_s, "wall_s": time.time() - t_start,
        "metrics": {k: metrics[k] for k in keep if k in metrics},
        "rounds": per_round if config.rounds > 1 else None,
        "examples": gold["examples"], "config": asdict(config),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line; exit code 0, or 2 for bad flags or an unusable data dir."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataclass_args(parser, ReplayConfig)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_args(ReplayConfig, args)
        load_annotator(config.annotator)
    except (ValueError, ImportError) as exc:
        parser.error(str(exc))
    try:
        result = run(config)
    except ValueError as exc:
        print(f"ppo_replay: {exc}", file=sys.stderr)
        return 2
    if config.json:
        Path(config.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
